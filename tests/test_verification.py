"""fcnify.verification: one comparison rule, and the modes the command line takes from fcnify.Mode."""

import pytest
import torch

import fcnify
from fcnify.cli._args import add_model_arguments
from fcnify.verification import DEFAULT_RTOL, ONNX_RTOL, compare


def test_tolerance_is_relative_to_the_largest_reference_value_however_small():
    small = compare([(torch.tensor([1e-3]), torch.tensor([1e-3 + 5e-5]))])  # 5% off: fails at any scale
    assert small.scale == pytest.approx(1e-3) and small.tolerance == pytest.approx(1e-3 * DEFAULT_RTOL)
    assert not small.passed
    assert compare([(torch.tensor([1e-8]), torch.tensor([1e-8 * (1 + 1e-6)]))]).passed
    large = compare([(torch.tensor([100.0, 1.0]), torch.tensor([100.0, 1.05]))])
    assert large.scale == 100.0 and large.tolerance == pytest.approx(100 * DEFAULT_RTOL) and not large.passed
    assert compare([(torch.tensor([100.0]), torch.tensor([100.05]))], rtol=ONNX_RTOL).passed


def test_several_pairs_share_one_scale_and_the_worst_error():
    c = compare([(torch.ones(3), torch.ones(3) * 1.5), (torch.full((2,), 10.0), torch.full((2,), 10.0))])
    assert c.max_abs_error == 0.5 and c.scale == 10.0 and c.max_rel_error == 0.05


def test_mode_is_a_str_enum_and_the_cli_takes_its_choices_from_it():
    import argparse

    assert fcnify.Mode("window") is fcnify.Mode.WINDOW == "window"
    assert fcnify.MODES == ("window", "dense", "global")
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    mode = next(a for a in parser._actions if a.dest == "mode")
    assert tuple(mode.choices) == fcnify.MODES and mode.default == "window"
    with pytest.raises(fcnify.FcnifyError, match="unknown mode 'sliding'. Hint: use one of window, dense, global"):
        fcnify.convert(torch.nn.Conv2d(3, 3, 1), (4, 4), mode="sliding")
