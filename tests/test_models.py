"""Real torchvision and timm classifiers, converted in every mode and verified."""

import pytest
import timm
import torch
import torchvision

import fcnify
from fcnify.zoo import calibrate_batchnorm

FAST_TORCHVISION = [
    "resnet18",
    "vgg11",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "squeezenet1_1",
    "convnext_tiny",
]
FAST_TIMM = ["resnet18", "convnext_atto", "mobilenetv3_small_050"]
MODES = ["window", "dense", "global"]


def _torchvision(name):
    # calibrated statistics keep the logits of order one (EfficientNet's would be ~1e-14)
    return calibrate_batchnorm(torchvision.models.get_model(name), (224, 224))


def _timm(name):
    model = timm.create_model(name)
    return calibrate_batchnorm(model, model.pretrained_cfg["input_size"][1:])


def _check(model, fcn, mode, size):
    """Verify independently of fcnify.verify: run both models and compare here."""
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x)
        out = fcn(x)
        big = fcn(torch.randn(1, 3, size[0] + 64, size[1] + 96))
    scale = max(1.0, ref.abs().max().item())
    assert ref.abs().max() > 1e-2, "logits this small would make any comparison pass"
    if mode == "window":
        assert out.shape == (*ref.shape, 1, 1)
        torch.testing.assert_close(out[..., 0, 0], ref, atol=1e-4 * scale, rtol=0)
        assert big.shape[2:] > (1, 1) and big.shape[:2] == (1, ref.shape[1])
    elif mode == "global":
        torch.testing.assert_close(out, ref, atol=1e-4 * scale, rtol=0)
        assert big.shape == (1, ref.shape[1])
    else:
        assert out.dim() == 4 and out.shape[:2] == ref.shape
        if fcn.conversion_report.checks == ["mean"]:
            torch.testing.assert_close(out.mean((2, 3)), ref, atol=1e-4 * scale, rtol=0)
    report = fcn.conversion_report
    assert report.verification.passed
    assert report.verification.max_abs_error <= 1e-4 * scale


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAST_TORCHVISION)
def test_torchvision(name, mode):
    model = _torchvision(name)
    fcn = fcnify.convert(model, input_size=(224, 224), mode=mode)
    _check(model, fcn, mode, (224, 224))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAST_TIMM)
def test_timm(name, mode):
    model = _timm(name)
    fcn = fcnify.convert(model, mode=mode)  # input size from timm's pretrained_cfg
    assert fcn.conversion_report.input_size == tuple(model.pretrained_cfg["input_size"])
    _check(model, fcn, mode, model.pretrained_cfg["input_size"][1:])


def _crop_head_check(model, fcn, body_output, head):
    """Each window cell equals the original head applied to that window of the feature map."""
    feats = {}
    handle = body_output.register_forward_hook(lambda m, i, o: feats.__setitem__("map", o))
    x = torch.randn(1, 3, 224 + 64, 224 + 96)
    with torch.no_grad():
        model(x)
        out = fcn(x)
    handle.remove()
    fmap = feats["map"]
    h = w = 7
    assert out.shape[2:] == (fmap.shape[2] - h + 1, fmap.shape[3] - w + 1)
    for i, j in [(0, 0), (1, 2), (out.shape[2] - 1, out.shape[3] - 1)]:
        with torch.no_grad():
            expected = head(fmap[:, :, i : i + h, j : j + w])
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(out[:, :, i, j], expected, atol=1e-4 * scale, rtol=0)


@pytest.mark.slow
def test_window_cells_are_the_head_on_each_window_resnet18():
    model = _torchvision("resnet18")
    fcn = fcnify.convert(model, input_size=224)
    _crop_head_check(model, fcn, model.layer4, lambda f: model.fc(torch.flatten(model.avgpool(f), 1)))


@pytest.mark.slow
def test_window_cells_are_the_head_on_each_window_vgg11():
    model = _torchvision("vgg11")
    fcn = fcnify.convert(model, input_size=224)
    assert any(r.rule == "LinearToConv" and "(7, 7)" in r.after for r in fcn.conversion_report.rewrites)
    _crop_head_check(model, fcn, model.features, lambda f: model.classifier(torch.flatten(model.avgpool(f), 1)))


@pytest.mark.slow
def test_googlenet_and_inception_convert():
    for name, size in (("googlenet", 224), ("inception_v3", 299)):
        model = torchvision.models.get_model(name, init_weights=False).eval()
        fcn = fcnify.convert(model, input_size=size)
        assert fcn.conversion_report.verification.passed


def test_transformer_is_refused_with_a_reason():
    model = torchvision.models.vit_b_16().eval()
    with pytest.raises(fcnify.UnsupportedModelError, match="tokens"):
        fcnify.convert(model, input_size=224)


def test_original_model_is_untouched():
    model = _torchvision("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fcn = fcnify.convert(model, input_size=224)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert fcn.training  # same state as the original
    assert isinstance(model.fc, torch.nn.Linear)
