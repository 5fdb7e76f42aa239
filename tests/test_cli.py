"""The command line, as a user runs it: conversion, saving, reloading, and mistakes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

import fcnify
from fcnify.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None, cwd=None):
    """``python -m fcnify ARGS`` in a fresh interpreter that imports this checkout's fcnify."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "fcnify", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI saves to the working directory by default


@pytest.mark.slow
def test_convert_saves_a_program_that_runs_at_any_size_without_fcnify(tmp_path):
    out = tmp_path / "r18.pt2"
    result = run_cli("convert", "resnet18", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "Linear(512 -> 1000) -> Conv2d(512, 1000, kernel_size=(1, 1))" in result.stdout
    assert "verification (window mode, input 3x224x224): passed" in result.stdout
    assert f"saved {out}" in result.stdout
    # Load in a fresh interpreter where importing fcnify is impossible.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["fcnify"] = None
        import torch
        fcn = torch.export.load({str(out)!r}).module()
        for size in [(224, 224), (300, 417)]:
            print(tuple(fcn(torch.randn(1, 3, *size)).shape))
        """
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split("\n")[:2] == ["(1, 1000, 1, 1)", "(1, 1000, 4, 8)"]


@pytest.mark.slow
def test_saved_program_matches_the_converted_model(tmp_path):
    import fcnify
    from fcnify import save

    model = torchvision.models.mobilenet_v3_small().eval()
    fcn = fcnify.convert(model, input_size=224, mode="dense")
    path = save(fcn, str(tmp_path / "m.pt2"), (3, 224, 224))
    program = torch.export.load(path).module()
    for size in [(224, 224), (257, 331)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(program(x), fcn(x), atol=1e-5, rtol=1e-5)


def test_weights_file_is_loaded(tmp_path, capsys):
    model = torchvision.models.squeezenet1_1()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    assert main(["convert", "squeezenet1_1", "--weights", str(tmp_path / "w.pth"), "--no-save"]) == 0
    assert "passed" in capsys.readouterr().out


def test_weights_that_do_not_fit_are_one_clear_line(tmp_path, capsys):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    assert main(["convert", "squeezenet1_1", "--weights", str(tmp_path / "r18.pth"), "--no-save"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fcnify: error: weights in") and "do not fit" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "resnet5"], "did you mean resnet50"),
        (["convert", "resnet18", "--weights", "/no/such/file.pth"], "weights file not found"),
        (["convert", "resnet18", "-o", "/no/such/dir/x.pt2"], "folder /no/such/dir does not exist"),
        (["export", "resnet18", "-o", "/no/such/dir/x.onnx"], "folder /no/such/dir does not exist"),
        (["convert", "vgg11", "--input-size", "16"], "fails on a 3x16x16 input"),
        (["convert", "vit_b_16", "--no-save"], "transformer head"),
    ],
)
def test_user_mistakes_exit_non_zero_without_traceback(args, message, capsys):
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("fcnify") and len(err.strip().splitlines()) <= 3
    assert message in err


def test_a_mistyped_command_is_answered_by_argparse_in_a_fresh_interpreter():
    result = run_cli("convrt", "resnet18")
    assert result.returncode == 2
    assert "invalid choice: 'convrt'" in result.stderr and "Traceback" not in result.stderr


def test_building_the_command_line_imports_no_torch():
    """``fcnify --help`` and a typo answer at once: the parser needs neither torch nor timm nor onnx."""
    script = (
        "import sys, fcnify.cli._main as m; m._parser(); print(sorted({'torch', 'timm', 'onnx'} & set(sys.modules)))"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_broken_weights_file(tmp_path, capsys):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    assert main(["convert", "resnet18", "--weights", str(tmp_path / "broken.pth")]) == 1
    assert "cannot read weights file" in capsys.readouterr().err


def test_saved_model_file_as_model(tmp_path, capsys):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5), torch.nn.Flatten(), torch.nn.Linear(4 * 24 * 24, 10))
    torch.save(net, tmp_path / "lenet.pt")
    code = main(
        [
            "convert",
            str(tmp_path / "lenet.pt"),
            "--trust-pickle",
            "--input-size",
            "28",
            "-o",
            str(tmp_path / "lenet.pt2"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "kernel_size=(24, 24)" in capsys.readouterr().out
    program = torch.export.load(str(tmp_path / "lenet.pt2")).module()
    assert program(torch.randn(1, 1, 40, 50)).shape == (1, 10, 13, 23)


def test_input_size_is_required_for_a_plain_module(tmp_path, capsys):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5), torch.nn.Flatten(), torch.nn.Linear(4 * 24 * 24, 10))
    torch.save(net, tmp_path / "lenet.pt")
    assert main(["convert", str(tmp_path / "lenet.pt"), "--trust-pickle"]) == 1
    assert "--input-size" in capsys.readouterr().err


def test_a_pickled_model_needs_trust_and_a_library_name_wins_over_a_file(tmp_path, capsys, monkeypatch):
    """Unpickling runs code from the file: refused without --trust-pickle, in one line."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5), torch.nn.Flatten(), torch.nn.Linear(4 * 24 * 24, 10))
    torch.save(net, tmp_path / "lenet.pt")
    assert main(["convert", str(tmp_path / "lenet.pt"), "--input-size", "28", "--no-save"]) == 1
    err = capsys.readouterr().err
    assert "pickled whole model" in err and "--trust-pickle" in err and len(err.splitlines()) == 1
    monkeypatch.chdir(tmp_path)
    torch.save(net, tmp_path / "resnet18")  # a file named like torchvision's resnet18
    model, _ = fcnify.load_model("resnet18")
    assert model.fc.out_features == 1000
    with pytest.warns(UserWarning, match="runs code stored in the file"):
        model, _ = fcnify.load_model("./resnet18", trust=True)
    assert isinstance(model, torch.nn.Sequential)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = capsys.readouterr().out
    for option in ("--weights", "--pretrained", "--input-size", "--mode", "--output"):
        assert option in out


def _fake_hf_cache(root, repo, state):
    from safetensors.torch import save_file

    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)


@pytest.mark.slow
def test_pretrained_timm_weights_come_from_the_local_hub_cache(tmp_path):
    import timm

    model = timm.create_model("resnet18")
    torch.nn.init.constant_(model.fc.bias, 0.25)
    _fake_hf_cache(
        tmp_path, model.pretrained_cfg["hf_hub_id"], {k: v.contiguous() for k, v in model.state_dict().items()}
    )
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    script = textwrap.dedent(
        """
        from fcnify import load_model
        model, size = load_model("timm/resnet18", pretrained=True)
        print(float(model.fc.bias.mean()), size)
        """
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "0.25 (224, 224)"
    result = run_cli("convert", "timm/resnet18", "--pretrained", "--no-save", env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_pretrained_torchvision_weights_come_from_the_torch_hub_cache(tmp_path):
    from torchvision.models import ResNet18_Weights

    model = torchvision.models.resnet18()
    torch.nn.init.constant_(model.fc.bias, 0.5)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(model.state_dict(), checkpoints / os.path.basename(ResNet18_Weights.DEFAULT.url))
    env = dict(os.environ, TORCH_HOME=str(tmp_path), PYTHONPATH=ROOT)
    script = (
        "from fcnify import load_model; m, s = load_model('resnet18', pretrained=True); "
        "print(float(m.fc.bias.mean()), s)"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "0.5 (224, 224)"
