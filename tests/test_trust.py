"""Trust: no wrong map passes verification, nothing the user passed in changes, threads are safe.

Each test stands for a class of failure found by trying hostile models and inputs.
"""

import copy
import threading

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import fcnify


def small_cnn(scale: float = 1.0, flatten: bool = False) -> nn.Module:
    """Conv -> ReLU -> pool -> Linear, with the head's weights scaled (small logits for ``scale < 1``)."""
    torch.manual_seed(0)
    head = nn.Linear(4 * 6 * 6, 3) if flatten else nn.Linear(4, 3)
    with torch.no_grad():
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    neck = nn.Flatten() if flatten else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), neck, head).eval()


# -- wrong results that passed verification ---------------------------------------------------


class InPlaceInput(nn.Module):
    """Normalises its input in place and ignores the result, as some preprocessing code does."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn()

    def forward(self, x):
        x.sub_(0.5).div_(0.25)
        return self.body(x)


def test_in_place_ops_on_the_input_are_kept():
    model = InPlaceInput().eval()
    fcn = fcnify.convert(model, input_size=(8, 8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x.clone())[..., 0, 0], model(x.clone()))


def test_each_model_gets_its_own_copy_of_the_input():
    """Without the in-place op, the converted model differs; fed one shared tensor, it would not show."""
    model = InPlaceInput().eval()
    without = fcnify.convert(model.body, input_size=(8, 8))
    assert not fcnify.verify(model, without, (8, 8)).passed


@pytest.mark.parametrize("scale", [1e-3, 1e-8])
def test_a_one_percent_error_fails_however_small_the_logits(scale):
    model = small_cnn(scale)
    fcn = fcnify.convert(model, input_size=(8, 8))
    assert fcnify.verify(model, fcn, (8, 8)).passed
    wrong = copy.deepcopy(fcn)
    conv = next(m for m in wrong.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 3)
    with torch.no_grad():
        conv.weight.mul_(1.01)
    assert not fcnify.verify(model, wrong, (8, 8)).passed


def test_a_transposed_kernel_fails_with_tiny_logits():
    model = small_cnn(1e-8, flatten=True)
    fcn = fcnify.convert(model, input_size=(8, 8))
    wrong = copy.deepcopy(fcn)
    conv = next(m for m in wrong.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (6, 6))
    with torch.no_grad():
        conv.weight.copy_(conv.weight.transpose(2, 3).clone())
    assert not fcnify.verify(model, wrong, (8, 8)).passed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["window", "dense"])
def test_half_precision_converts_with_a_tolerance_for_its_precision(dtype, mode):
    model = small_cnn().to(dtype)
    fcn = fcnify.convert(model, input_size=(8, 8), mode=mode)
    assert fcn.conversion_report.verification.passed
    assert fcn(torch.randn(1, 3, 12, 12, dtype=dtype)).dtype == dtype


# -- nothing the user passed in changes -------------------------------------------------------


def test_a_lazy_module_is_not_materialised_in_the_users_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).eval()
    fcn = fcnify.convert(model, input_size=(8, 8))
    assert type(model[3]) is nn.LazyLinear
    assert fcn.conversion_report.verification.passed


def _bn_state(model: nn.Module):
    return [b.clone() for b in model.buffers()]


def test_analysis_and_inference_run_a_train_mode_model_in_eval_mode():
    """BatchNorm statistics and results stay put, and the user's flags are left as they were."""
    model = torchvision.models.resnet18(num_classes=4).train()
    fcn = fcnify.convert(model, input_size=(64, 64))
    assert fcn.training
    before = _bn_state(fcn)
    image = torch.rand(1, 3, 96, 80)
    fcnify.geometry(fcn, (64, 64))
    fcnify.valid_sizes(fcn, (64, 64))
    first = fcnify.predict_padded(fcn, image)
    torch.testing.assert_close(fcnify.predict_padded(fcn, image), first)
    tiled = fcnify.predict_tiled(fcn, image, tile=(96, 96), progress=False)
    torch.testing.assert_close(fcnify.predict_tiled(fcn, image, tile=(96, 96), progress=False), tiled)
    for a, b in zip(before, _bn_state(fcn)):
        torch.testing.assert_close(a, b)
    assert fcn.training and all(m.training for m in fcn.modules())


def test_output_stride_on_a_train_mode_model():
    model = torchvision.models.resnet18(num_classes=4).train()
    fcn = fcnify.convert(model, input_size=(64, 64), output_stride=16)
    assert fcn.conversion_report.output_stride == 16
    assert model.training


# -- threads ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_conversions_in_threads_do_not_disturb_each_other_or_inference():
    """torch.fx patches nn.Module.__call__ for the whole process while it traces."""
    errors = []

    def convert():
        try:
            for _ in range(3):
                fcnify.convert(torchvision.models.resnet18(num_classes=4), input_size=(64, 64), verify=False)
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(repr(err))

    def infer():
        model = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
        try:
            with torch.no_grad():
                for _ in range(20):
                    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
        except Exception as err:  # noqa: BLE001
            errors.append(repr(err))

    threads = [threading.Thread(target=f) for f in (convert, convert, infer, infer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert torchvision.models.resnet18(num_classes=4).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)


# -- absurd sizes are refused before anything is allocated ------------------------------------


@pytest.mark.parametrize("bad", [(99999999999999999999, 224), "224", (224, "a"), (-1, 5), (3, 224, 224, 1), True])
def test_a_bad_input_size_is_one_clear_error(bad):
    with pytest.raises(fcnify.FcnifyError, match=r"input_size .*Hint: input_size"):
        fcnify.convert(small_cnn(), input_size=bad)


def test_a_training_size_too_large_for_memory_is_refused_with_the_estimate():
    """--input-size 100000 used to try to allocate 240 GB; the estimate runs on fake tensors."""
    with pytest.raises(
        fcnify.FcnifyError, match=r"needs about [\d.]+ [TP]B of memory .* available\. Hint: input_size is"
    ):
        fcnify.convert(torchvision.models.resnet18(), input_size=(100000, 100000))


def test_resizing_a_head_beyond_memory_is_refused():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10))
    with pytest.raises(fcnify.FcnifyError, match=r"needs about .* of memory"):
        fcnify.resize_head(net, (16, 16), (100000, 100000))


def test_a_heatmap_of_a_thousand_panels_is_refused():
    fcn = fcnify.convert(small_cnn(), input_size=(8, 8))
    with pytest.raises(fcnify.FcnifyError, match=r"one panel per class, from 1 to 32"):
        fcnify.heatmap(fcn, torch.rand(3, 16, 16), top=1000)


# -- files ------------------------------------------------------------------------------------


def test_a_failed_onnx_export_keeps_the_older_file(tmp_path):
    fcn = fcnify.convert(small_cnn(), input_size=(8, 8))
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an older export")
    with pytest.raises(fcnify.FcnifyError) as err:
        fcnify.export_onnx(fcn, str(path), input_size=(8, 8), opset=1)
    assert path.read_bytes() == b"an older export"
    assert ".fcnify-" not in str(err.value) and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_an_onnx_export_replaces_the_file_only_when_it_is_complete(tmp_path):
    fcn = fcnify.convert(small_cnn(), input_size=(8, 8))
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an older export")
    report = fcnify.export_onnx(fcn, str(path), input_size=(8, 8))
    assert report.passed and report.path == str(path) and path.stat().st_size > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("folder", "is a folder"),
        ("x.xyz", "must end in .png"),
        ("missing/x.png", "does not exist"),
    ],
)
def test_a_heatmap_picture_path_is_checked_before_drawing(tmp_path, name, message):
    (tmp_path / "folder").mkdir()
    fcn = fcnify.convert(small_cnn(), input_size=(8, 8))
    result = fcnify.heatmap(fcn, torch.rand(3, 16, 16), top=1)
    with pytest.raises(fcnify.FcnifyError, match=message):
        fcnify.render_heatmap(result, str(tmp_path / name))


# -- one clear line for every mistake in the Python API ---------------------------------------


@pytest.fixture(scope="module")
def small_fcn():
    return fcnify.convert(small_cnn(), input_size=(8, 8))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f: fcnify.predict_padded(f, torch.rand(1, 1, 20, 20)), "reads 3-channel images, got 1"),
        (lambda f: fcnify.predict_tiled(f, torch.rand(1, 20, 20), progress=False), "reads 3-channel images"),
        (lambda f: fcnify.predict_padded(f, (torch.rand(1, 3, 20, 20) * 255).to(torch.uint8)), "floating-point images"),
        (lambda f: fcnify.predict_tiled(f, torch.rand(3, 20, 20), device="bogus", progress=False), "unknown device"),
        (lambda f: fcnify.convert(None, input_size=(8, 8)), "expected a torch.nn.Module"),
        (lambda f: fcnify.convert(small_cnn(), input_size=(8, 8), rtol="x"), "rtol must be a positive number"),
        (lambda f: fcnify.valid_sizes(f, (-3, 8)), "positive sizes"),
    ],
    ids=["channels-padded", "channels-tiled", "uint8", "device", "none-model", "rtol", "negative-size"],
)
def test_api_mistakes_are_fcnify_errors(small_fcn, call, message):
    with pytest.raises(fcnify.FcnifyError, match=message):
        call(small_fcn)


def test_half_precision_input_runs_in_the_models_dtype(small_fcn):
    out = fcnify.predict_padded(small_fcn, torch.rand(1, 3, 20, 20).half())
    assert out.dtype == torch.float32 and out.shape[1] == 3


def test_nan_weights_are_named_not_blamed_on_the_head():
    model = small_cnn()
    with torch.no_grad():
        model[4].weight.fill_(float("nan"))
    with pytest.raises(fcnify.VerificationError, match=r"itself returns NaN or inf.*4\.weight"):
        fcnify.convert(model, input_size=(8, 8))


def test_a_corrupt_onnx_file_is_one_line(small_fcn, tmp_path):
    (tmp_path / "c.onnx").write_bytes(b"not a model")
    with pytest.raises(fcnify.ExportError, match="is not a readable ONNX model"):
        fcnify.validate_onnx(small_fcn, str(tmp_path / "c.onnx"), (8, 8))


def test_a_pruned_model_converts_exactly():
    prune = pytest.importorskip("torch.nn.utils.prune")
    model = small_cnn()
    prune.l1_unstructured(model[0], "weight", 0.5)
    fcn = fcnify.convert(model, input_size=(8, 8))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x)[..., 0, 0], model(x))
    assert hasattr(model[0], "weight_orig")  # the user's pruning is left in place


# -- the command line: outputs checked before the work, inputs never replaced -----------------


def test_cli_refuses_an_existing_output_without_force_and_never_writes_over_an_input(tmp_path, capsys, monkeypatch):
    from fcnify.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.pt2").write_bytes(b"an older conversion")
    assert main(["convert", "resnet18", "--input-size", "32", "-o", "r.pt2"]) == 1
    err = capsys.readouterr().err
    assert "r.pt2 exists. Hint: pass --force" in err and len(err.splitlines()) == 1
    assert (tmp_path / "r.pt2").read_bytes() == b"an older conversion"
    assert main(["convert", "resnet18", "--input-size", "32", "-o", "r.pt2", "--force"]) == 0
    assert "random weights" in capsys.readouterr().err  # said on every command that runs random weights
    assert main(["convert", "r.pt2", "--input-size", "32", "-o", "r.pt2", "--force"]) == 1
    assert "refusing to write the converted model over the input r.pt2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "output, message",
    [
        ("folder", "is a folder"),
        ("x.xyz", "must end in .png"),
        ("missing/x.png", "does not exist"),
        ("photo.png", "over the input photo.png"),
    ],
)
def test_cli_heatmap_output_mistakes_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, output, message):
    from PIL import Image

    from fcnify.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "photo.png")
    assert main(["heatmap", "resnet18", "photo.png", "-o", output, "--force"]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
