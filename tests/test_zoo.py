"""Model-zoo coverage: torchvision's classifiers and timm's families, converted and verified.

Every torchvision model and every timm representative is a parameter; the ones too costly for
the test budget (about 10 minutes on 2 CPU cores) are skipped with the reason given below and
are covered by the sweep that generates docs/coverage.md (``fcnify zoo``), which
``test_coverage_doc_*`` checks.
"""

import os
import re
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import fcnify
from fcnify.cli import _zoo as zoo
from fcnify.cli import zoo as zoo_command

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COVERAGE = os.path.join(ROOT, "docs", "coverage.md")

# -- torchvision ------------------------------------------------------------------------------

TORCHVISION_ENTRIES = {e.name: e for e in zoo.torchvision_entries()}

#: Test budget: models of at most 5 GFLOPs at their training size run here in all three modes.
#: Every other model is listed with its cost; docs/coverage.md shows it converted.
TORCHVISION_SKIP = {
    name: f"{entry.gflops:g} GFLOPs at the training size: above the 5-GFLOP test budget; covered by `fcnify zoo` "
    "(docs/coverage.md)"
    for name, entry in TORCHVISION_ENTRIES.items()
    if (entry.gflops or 0) > 5.0 and name not in ("vit_b_32", "swin_t")
}
#: The transformers that do run: one refused (class token), one converted (Swin pools a map).
TORCHVISION_TRANSFORMERS = {"vit_b_32": "refused", "swin_t": "exact"}


def _params(names, skip):
    return [pytest.param(n, marks=pytest.mark.skip(reason=skip[n])) if n in skip else n for n in names]


def _compare(model, traced, mode, fcn):
    """Check fcnify's verdict independently: run both models here at the training size."""
    x = torch.randn(1, *traced.input_size)
    with torch.no_grad():
        ref = model(x)
        out = fcn(x)
    scale = max(1.0, ref.abs().max().item())
    if mode == "window":
        assert out.shape == (*ref.shape, 1, 1)
        out = out[..., 0, 0]
    elif mode == "dense":
        if fcn.conversion_report.checks != ["mean"]:
            assert out.dim() == 4 and out.shape[:2] == ref.shape
            return
        out = out.mean((2, 3))
    torch.testing.assert_close(out, ref, atol=1e-4 * scale, rtol=0)


def _convert_every_mode(model, size):
    with torch.no_grad():
        traced = fcnify.trace(model, size, batch_size=1)
        for mode in zoo.MODES:
            fcn = traced.convert(mode)
            assert fcn.conversion_report.verification.passed
            _compare(model, traced, mode, fcn)
            if mode != "global":
                shape = fcn.conversion_report.probe_output_shapes[0]
                assert shape[2] > 1 and shape[3] > 1, "the output map must grow with the input"


@pytest.mark.zoo
@pytest.mark.parametrize("name", _params(sorted(TORCHVISION_ENTRIES), TORCHVISION_SKIP))
def test_torchvision_model(name):
    entry = TORCHVISION_ENTRIES[name]
    model, size = zoo.build_model(entry)
    if entry.kind == "cnn":
        _convert_every_mode(model, size)
        return
    expected = TORCHVISION_TRANSFORMERS[name]
    if expected == "exact":
        _convert_every_mode(model, size)
    else:
        with pytest.raises(fcnify.UnsupportedModelError, match="class token|tokens") as info:
            fcnify.convert(model, input_size=size)
        assert "Hint:" in str(info.value)


def test_torchvision_list_is_the_registry():
    names = torchvision.models.list_models(module=torchvision.models)
    assert sorted(TORCHVISION_ENTRIES) == sorted(names)
    cnns = [e for e in TORCHVISION_ENTRIES.values() if e.kind == "cnn"]
    assert len(cnns) == len(names) - sum(e.family in zoo.TORCHVISION_NON_CNN for e in TORCHVISION_ENTRIES.values())
    assert {e.family for e in TORCHVISION_ENTRIES.values() if e.kind != "cnn"} == set(zoo.TORCHVISION_NON_CNN)


# -- timm -------------------------------------------------------------------------------------

TIMM_ENTRIES = {e.name: e for e in zoo.timm_entries()}

#: Representatives left to the sweep, each with its reason (measured cost on 2 busy CPU cores).
TIMM_SKIP = {
    # transformers and hybrids: the sweep records their refusal or conversion
    **{
        e.name: f"{e.kind} family '{e.family}': covered by `fcnify zoo` (docs/coverage.md); the test budget goes "
        "to the CNN families"
        for e in TIMM_ENTRIES.values()
        if e.kind != "cnn"
    },
    # CNNs above the 5-GFLOP budget (GFLOPs at the pretrained_cfg size)
    "convmixer_1024_20_ks9_p14": "5.6 GFLOPs with a 1024-channel trunk at full resolution",
    "inception_resnet_v2": "13 GFLOPs at 299x299",
    "inception_v3": "5.7 GFLOPs at 299x299; torchvision's inception_v3 is the same architecture",
    "inception_v4": "12 GFLOPs at 299x299",
    "legacy_xception": "8.4 GFLOPs at 299x299",
    "nasnetalarge": "24 GFLOPs at 331x331",
    "pnasnet5large": "25 GFLOPs at 331x331",
    "rdnet_tiny": "5.1 GFLOPs",
    "tresnet_m": "5.7 GFLOPs",
    "vgg11": "7.6 GFLOPs; test_peer_failures runs it",
    "xception41": "9.3 GFLOPs at 299x299",
}


@pytest.mark.zoo
@pytest.mark.parametrize("name", _params(sorted(TIMM_ENTRIES), TIMM_SKIP))
def test_timm_representative(name):
    entry = TIMM_ENTRIES[name]
    model, size = zoo.build_model(entry)
    assert size == tuple(model.pretrained_cfg["input_size"][1:])
    _convert_every_mode(model, size)


def test_every_timm_family_has_a_representative():
    families = zoo.timm_families()
    missing = sorted(set(families) - set(zoo.TIMM_REPRESENTATIVES))
    assert not missing, f"new timm families: add a representative to fcnify.cli._zoo.TIMM_REPRESENTATIVES: {missing}"
    for family, names in zoo.TIMM_REPRESENTATIVES.items():
        assert set(names) <= set(families[family]), family
    assert set(zoo.TIMM_NON_CNN) <= set(families)


# -- the closest peer's failures: timm's TestTimePoolHead -------------------------------------


def _test_time_pool(model):
    import copy

    from timm.layers import TestTimePoolHead

    return TestTimePoolHead(copy.deepcopy(model), original_pool=model.pretrained_cfg["pool_size"]).eval()


@pytest.mark.zoo
@pytest.mark.parametrize(
    "name, peer",
    [
        ("convnext_atto", "wrong"),  # TestTimePoolHead skips the head norm: silently different logits
        ("mobilenetv3_small_050", "crash"),  # conv head with a hidden size: the 1x1 conv has the wrong shape
        ("vgg11", "crash"),  # ConvMlp pre-logits: same
    ],
)
def test_peer_failures_are_exact_here(name, peer):
    model = timm.create_model(name).eval()
    size = tuple(model.pretrained_cfg["input_size"][1:])
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        ref = model(x)
        if peer == "wrong":
            out = _test_time_pool(model)(x)
            assert out.shape == ref.shape
            assert (out - ref).abs().max() > 1e-2 * ref.abs().max(), "timm's TestTimePoolHead is now exact"
        else:
            with pytest.raises(RuntimeError):
                _test_time_pool(model)(x)
        traced = fcnify.trace(model, batch_size=1)
        for mode in ("window", "global"):
            fcn = traced.convert(mode)
            out = fcn(x)
            out = out[..., 0, 0] if mode == "window" else out
            torch.testing.assert_close(out, ref, atol=1e-4 * max(1.0, ref.abs().max().item()), rtol=0)
            big = fcn(torch.randn(1, 3, size[0] + 64, size[1] + 96))
            assert big.shape[1] == ref.shape[1]


# -- several outputs in eval mode -------------------------------------------------------------


class MainAndAux(nn.Module):
    """A classifier returning ``(main, aux)`` in eval mode, the aux head on an earlier map."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(16, 5)
        self.aux_conv = nn.Conv2d(8, 4, 1)
        self.aux_fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        f = self.stem(x)
        main = self.fc(self.body(f).mean((2, 3)))
        aux = nn.functional.adaptive_avg_pool2d(f, (3, 3))
        aux = self.aux_fc(torch.flatten(torch.relu(self.aux_conv(aux)), 1))
        return main, aux


def _googlenet_with_aux():
    from torchvision.models.googlenet import GoogLeNet

    class GoogLeNetWithAux(GoogLeNet):
        """torchvision's GoogLeNet, returning its auxiliary logits in eval mode too."""

        def forward(self, x):
            x = self._transform_input(x)
            x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
            x = self.inception4a(self.maxpool3(self.inception3b(self.inception3a(x))))
            aux1 = self.aux1(x)
            x = self.inception4d(self.inception4c(self.inception4b(x)))
            aux2 = self.aux2(x)
            x = self.inception5b(self.inception5a(self.maxpool4(self.inception4e(x))))
            return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1))), aux2, aux1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GoogLeNetWithAux(aux_logits=True, init_weights=False).eval()


def _inception_v3_with_aux():
    from torchvision.models.inception import Inception3

    class Inception3WithAux(Inception3):
        """torchvision's Inception v3, returning its auxiliary logits in eval mode too."""

        def _forward(self, x):
            for name in (
                "Conv2d_1a_3x3",
                "Conv2d_2a_3x3",
                "Conv2d_2b_3x3",
                "maxpool1",
                "Conv2d_3b_1x1",
                "Conv2d_4a_3x3",
                "maxpool2",
                "Mixed_5b",
                "Mixed_5c",
                "Mixed_5d",
                "Mixed_6a",
                "Mixed_6b",
                "Mixed_6c",
                "Mixed_6d",
                "Mixed_6e",
            ):
                x = getattr(self, name)(x)
            aux = self.AuxLogits(x)
            for name in ("Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool", "dropout"):
                x = getattr(self, name)(x)
            return self.fc(torch.flatten(x, 1)), aux

        def forward(self, x):
            return self._forward(self._transform_input(x))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Inception3WithAux(aux_logits=True, init_weights=False).eval()


def test_every_head_of_a_two_output_model_converts():
    model = MainAndAux().eval()
    x = torch.randn(1, 3, 40, 48)
    for mode in zoo.MODES:
        fcn = fcnify.convert(model, input_size=(24, 24), mode=mode)
        checks = fcn.conversion_report.verification.outputs
        assert len(checks) == 2 and all(c.passed and c.check != "none" for c in checks)
        main, aux = fcn(x)
        if mode != "global":
            assert main.shape[2:] > (1, 1) and aux.shape[2:] > (1, 1)
    # window mode: each aux cell is the aux head applied to that 12x12 window of the stem's map
    fcn = fcnify.convert(model, input_size=(24, 24))
    with torch.no_grad():
        f = model.stem(x)
        _, aux = fcn(x)
        for i, j in [(0, 0), (2, 5), (aux.shape[2] - 1, aux.shape[3] - 1)]:
            crop = nn.functional.adaptive_avg_pool2d(f[:, :, i : i + 12, j : j + 12], (3, 3))
            expected = model.aux_fc(torch.flatten(torch.relu(model.aux_conv(crop)), 1))
            torch.testing.assert_close(aux[:, :, i, j], expected, atol=1e-5, rtol=0)


@pytest.mark.zoo
def test_googlenet_auxiliary_heads_convert():
    model = _googlenet_with_aux()
    with torch.no_grad():
        traced = fcnify.trace(model, (224, 224), batch_size=1)
        for mode in zoo.MODES:
            fcn = traced.convert(mode)
            outputs = fcn.conversion_report.verification.outputs
            assert len(outputs) == 3 and all(o.passed and o.check != "none" for o in outputs)
        fcn = traced.convert("window")
    # window mode, aux1 off the origin: the aux head on that 14x14 window of inception4a's map
    feats = {}
    handle = model.inception4a.register_forward_hook(lambda m, i, o: feats.__setitem__("map", o))
    x = torch.randn(1, 3, 224 + 32, 224 + 64)
    with torch.no_grad():
        model(x)
        aux1 = fcn(x)[2]
        handle.remove()
        for i, j in [(0, 0), (1, 3), (aux1.shape[2] - 1, aux1.shape[3] - 1)]:
            expected = model.aux1(feats["map"][:, :, i : i + 14, j : j + 14])
            torch.testing.assert_close(aux1[:, :, i, j], expected, atol=1e-4 * max(1, expected.abs().max()), rtol=0)


@pytest.mark.zoo
def test_inception_v3_auxiliary_head_converts():
    model = _inception_v3_with_aux()
    with torch.no_grad():
        fcn = fcnify.trace(model, (299, 299), batch_size=1).convert("window")
    outputs = fcn.conversion_report.verification.outputs
    assert len(outputs) == 2 and all(o.passed for o in outputs)
    main, aux = fcn.conversion_report.probe_output_shapes
    assert main[2:] > (1, 1) and aux[2:] > (1, 1)


# -- the sweep, the table and the command -----------------------------------------------------


def test_check_reports_exact_refused_and_failed():
    exact = zoo.check(zoo.ZooEntry("torchvision", "squeezenet1_1", "squeezenet"), modes=("window",))
    assert exact.status == "exact" and exact.modes == {"window": "exact"}
    assert exact.max_abs_error is not None and exact.max_abs_error < 1e-3
    assert exact.output_map[0] == 1000 and exact.output_map[1] > 1
    labelled = zoo.check(zoo.ZooEntry("torchvision", "squeezenet1_1", "squeezenet", "hybrid"), ("window",), onnx="cnn")
    assert labelled.status == "exact" and labelled.onnx == "skipped" and "--onnx cnn" in labelled.onnx_reason
    missing = zoo.check(zoo.ZooEntry("timm", "no_such_model", "none"), modes=("window",))
    assert missing.status == "failed" and "no_such_model" in missing.reason
    table = zoo.coverage_markdown([exact, missing])
    assert "| `squeezenet1_1` | squeezenet | cnn | 224x224 | exact |" in table
    assert "failed:" in table


def test_calibrated_batchnorm_makes_logits_of_order_one():
    """torchvision's EfficientNet init gives ~1e-14 logits, against which any error looks exact."""
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model(x).abs().max() < 1e-6
        assert zoo.calibrate_batchnorm(model, (224, 224)) is model and not model.training
        assert model(x).abs().max() > 0.1


@pytest.mark.onnx
def test_sweep_in_two_processes_with_the_onnx_column(tmp_path, capsys):
    from fcnify.cli import main

    out = tmp_path / "coverage.md"
    assert (
        main(
            [
                "zoo",
                "--torchvision",
                "--filter",
                "squeezenet*",
                "--modes",
                "window",
                "--onnx",
                "--jobs",
                "2",
                "--threads",
                "1",
                "--no-progress",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "2/2 converted models exported and validated" in capsys.readouterr().out
    text = out.read_text()
    assert "--onnx --jobs 2 --threads 1 -o" in text and "| ONNX |" in text
    cells = [line.rsplit("|", 2)[1].strip() for line in text.splitlines() if line.startswith("| `squeezenet")]
    assert len(cells) == 2
    for cell in cells:
        error = re.fullmatch(r"(\S+) at 3 sizes \(\d+ s\)", cell)
        assert error and float(error.group(1)) < 1e-4, cell


def _fake(library, name, family, kind="cnn", status="exact", onnx=None):
    return zoo.ZooResult(
        zoo.ZooEntry(library, name, family, kind),
        status,
        reason="" if status == "exact" else "why",
        modes={"window": status},
        max_abs_error=1e-7,
        input_size=(3, 224, 224),
        onnx=onnx,
        onnx_reason="failed: because" if onnx == "failed" else "",
    )


def test_a_sweep_of_one_library_keeps_the_other_section():
    old = zoo.coverage_markdown([_fake("torchvision", "alexnet", "alexnet"), _fake("timm", "old_net", "old")])
    new = zoo.coverage_markdown([_fake("timm", "resnet18", "resnet")], "fcnify zoo --timm")
    merged = zoo.merge_sections(old, new)
    assert merged.index("`alexnet`") < merged.index("## timm") < merged.index("`resnet18`")
    assert "old_net" not in merged and "Generated by `fcnify zoo --timm`." in merged


@pytest.mark.zoo  # sweeps real models
def test_a_sweep_of_some_models_replaces_their_rows_and_recounts(tmp_path, capsys):
    from fcnify.cli import main

    out = tmp_path / "coverage.md"
    out.write_text(
        zoo.coverage_markdown(
            [
                _fake("torchvision", "alexnet", "alexnet"),
                _fake("timm", "lcnet_035", "mobilenetv3", status="failed"),
                _fake("timm", "davit_tiny", "davit", "transformer"),
            ],
            "fcnify zoo --timm",
        )
    )
    assert main(["zoo", "--timm", "--filter", "lcnet_035", "--modes", "window", "--no-progress", "-o", str(out)]) == 0
    text = out.read_text()
    assert "Generated by `fcnify zoo --timm`." in text and "`alexnet`" in text and "`davit_tiny`" in text
    assert (
        "Rows of the models it matches re-checked by `fcnify zoo --timm --filter 'lcnet_035' --modes window -o" in text
    )
    assert "| `lcnet_035` | mobilenetv3 | cnn | 224x224 | exact |" in text and "failed" not in text
    assert (
        "**1/1 CNN family representatives exact; 1 transformer, hybrid or MLP family representatives: 1 exact.**"
        in text
    )
    # no ONNX column before: a sweep with --onnx adds it, and the other rows get an empty cell
    assert (
        main(
            [
                "zoo",
                "--timm",
                "--kind",
                "cnn",
                "--filter",
                "lcnet_035",
                "--modes",
                "window",
                "--onnx",
                "--no-progress",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert "*ONNX*:" in text and "| ONNX |" in text and "ONNX: 1/1 converted models exported" in text
    assert re.search(r"\| `lcnet_035` .* \| \S+ at 3 sizes \(\d+ s\) \|", text)
    assert re.search(r"\| `davit_tiny` .*\|  \|$", text, re.M)
    assert text.count("Rows of the models it matches") == 2
    assert [e.name for e in zoo.select(zoo.timm_entries(), "lcnet_035, davit*")] == ["davit_tiny", "lcnet_035"]
    assert zoo_command.main(["--kind", "cnn,vit"]) == 1
    assert "unknown kind(s) vit" in capsys.readouterr().err


def test_zoo_command_writes_the_table(tmp_path, capsys):
    from fcnify.cli import main

    out = tmp_path / "coverage.md"
    assert (
        main(
            ["zoo", "--torchvision", "--filter", "squeezenet1_1", "--modes", "window", "--no-progress", "-o", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "torchvision: 1/1 CNN models exact" in printed
    assert "`squeezenet1_1`" in out.read_text()
    assert zoo_command.main(["--filter", "no-such-*"]) == 1
    assert "no model matches" in capsys.readouterr().err


def _coverage_rows():
    if not os.path.exists(COVERAGE):
        pytest.fail("docs/coverage.md is missing; regenerate it with `fcnify zoo -o docs/coverage.md`")
    rows = {}
    section = None
    for line in open(COVERAGE):
        if line.startswith("## "):
            section = line[3:].strip()
        match = re.match(r"\| `([^`]+)` \| ([^|]+) \| ([^|]+) \| [^|]* \| ([^|]+?) \|", line)
        if match:
            rows[(section, match.group(1))] = (match.group(2).strip(), match.group(3).strip(), match.group(4))
    return rows


def test_coverage_doc_lists_every_torchvision_model_and_every_cnn_is_exact():
    rows = _coverage_rows()
    for name in TORCHVISION_ENTRIES:
        assert ("torchvision", name) in rows, f"{name} is missing from docs/coverage.md"
        family, kind, status = rows[("torchvision", name)]
        if kind == "cnn":
            assert status == "exact", f"{name}: {status}"
        else:
            assert status.startswith(("exact", "refused", "partial")) and "failed" not in status, name


def test_coverage_doc_has_every_timm_family_and_every_cnn_family_is_exact():
    rows = _coverage_rows()
    timm_rows = {name: row for (section, name), row in rows.items() if section == "timm"}
    families = {row[0] for row in timm_rows.values()}
    assert set(zoo.timm_families()) <= families
    for name, (_, kind, status) in timm_rows.items():
        if kind == "cnn":
            assert status == "exact", f"{name}: {status}"
        else:
            assert not status.startswith("failed"), f"{name}: {status}"


#: Converted models whose ONNX export fails validation in docs/coverage.md, each with the reason
#: found. Any other failure in the table fails the test.
KNOWN_ONNX_FAILURES: dict = {}


def test_coverage_doc_onnx_column_every_converted_model_exports():
    rows = [line.split("|")[1:-1] for line in open(COVERAGE) if line.startswith("| `")]
    assert all(len(r) == 9 for r in rows), "docs/coverage.md has no ONNX column: run fcnify zoo --onnx"
    for cells in rows:
        name, status, onnx = cells[0].strip(" `"), cells[4].strip(), cells[8].strip()
        if not status.startswith(("exact", "partial")):
            continue  # nothing to export
        if name in KNOWN_ONNX_FAILURES:
            assert onnx.startswith("failed"), f"{name} now exports: take it off KNOWN_ONNX_FAILURES"
            continue
        match = re.fullmatch(r"(\S+) at 3 sizes \(\d+ s(, (dense|global) mode)?\)", onnx)
        assert match, f"{name}: ONNX {onnx}"
        assert float(match.group(1)) < 1e-2, f"{name}: ONNX Runtime differs by {match.group(1)}"
