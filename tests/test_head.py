"""Where the head starts, and a verification that catches a head found in the wrong place.

The correct map is the original head applied at every cell of the body's own final map; these
tests compute it independently of fcnify (``fc(features(x)[..., i, j])``) and compare.
"""

import pytest
import torch
from torch import nn

import fcnify
import fcnify.conversion._rewrite
import fcnify.conversion.rules.global_pool_to_window_pool as global_pool
from fcnify import VerificationError


class TransitionAtEnd(nn.Module):
    """Four stride-2 pools: at 32x32 the last one turns a 2x2 map into 1x1, and a 3x3 conv follows."""

    def __init__(self, pool=nn.AvgPool2d, c: int = 8, final=None):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, 2, 1), nn.ReLU(), pool(2),
            nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), pool(2),
            nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), pool(2),
            nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), pool(2),  # 2x2 -> 1x1 at 32x32
            nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(),  # spatial layers after it
        )  # fmt: skip
        self.pool = final if final is not None else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def per_cell(head, features: torch.Tensor) -> torch.Tensor:
    """``head`` applied to the feature vector of every cell: ``(N, C, h, w) -> (N, K, h, w)``."""
    return head(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("pool", [nn.AvgPool2d, nn.MaxPool2d], ids=["avg", "max"])
def test_a_pool_that_reaches_1x1_before_convolutions_stays_in_the_body(pool):
    model = TransitionAtEnd(pool).eval()
    fcn = fcnify.convert(model, input_size=(32, 32))
    assert [r.node for r in fcn.conversion_report.rewrites][0] == "pool"  # not features_11
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out, expected = fcn(x), per_cell(model.fc, model.features(x))
    assert out.shape == (1, 5, 2, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class Mean(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def test_a_mean_as_the_global_pool_leaves_the_transition_in_the_body():
    model = TransitionAtEnd(final=Mean()).eval()
    fcn = fcnify.convert(model, input_size=(32, 32))
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x), per_cell(model.fc, model.features(x)), rtol=1e-5, atol=1e-5)


def test_the_last_pool_before_the_head_still_slides_with_stride_1():
    """A fixed pool that is itself the last spatial layer is the head's pool: it slides, exactly."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AvgPool2d(6), nn.Flatten(), nn.Linear(4, 3)).eval()
    fcn = fcnify.convert(model, input_size=(8, 8))
    x = torch.randn(1, 3, 12, 13)
    with torch.no_grad():
        crops = torch.stack(
            [torch.stack([model(x[..., i : i + 8, j : j + 8])[0] for j in range(6)], -1) for i in range(5)], -2
        )
        torch.testing.assert_close(fcn(x)[0], crops, rtol=1e-5, atol=1e-5)


def test_the_old_head_finding_fails_its_own_verification(monkeypatch):
    """Were the transition pool taken for the head's pool again, the cell check would refuse the result."""
    monkeypatch.setattr(fcnify.conversion._rewrite, "_spatial_tail", lambda *args: set())
    with pytest.raises(VerificationError, match=r"cells at 64x96 .*FAILED"):
        fcnify.convert(TransitionAtEnd().eval(), input_size=(32, 32))


def test_a_window_pool_of_the_wrong_stride_fails_verification(monkeypatch):
    """The map size is checked against the body's: a pool sliding at stride 2 gives too few cells."""
    real = torch.nn.functional.avg_pool2d

    def stride_2(x, kernel_size, stride=None, *args, **kwargs):
        return real(x, kernel_size, 2, *args, **kwargs)

    monkeypatch.setattr(global_pool.F, "avg_pool2d", stride_2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(VerificationError, match=r"wrong map size"):
        fcnify.convert(model.eval(), input_size=(12, 12))


def test_a_flipped_dense_map_fails_verification(monkeypatch):
    """Dense mode after an average pool: the mean of a flipped map is right, its cells are not."""
    rewrite = global_pool.GlobalPoolToWindowPool.rewrite

    def flipped(self, node, ctx, match):
        return ctx.method("flip", rewrite(self, node, ctx, match), (2, 3))

    monkeypatch.setattr(global_pool.GlobalPoolToWindowPool, "rewrite", flipped)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(VerificationError, match=r"cells at .*FAILED"):
        fcnify.convert(model.eval(), input_size=(12, 12), mode="dense")


def test_dense_mode_after_a_max_pool_is_checked_cell_by_cell():
    """No exact check existed for a max pool in dense mode; each cell is now the head on one position."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    fcn = fcnify.convert(model.eval(), input_size=(12, 12), mode="dense")
    cells = [o for o in fcn.conversion_report.verification.outputs if o.check == "cells"]
    assert len(cells) == 1 and cells[0].passed and cells[0].shape == cells[0].reference_shape


@pytest.mark.slow
def test_monai_densenet121_at_32x32_is_exact_at_every_size():
    """MONAI's DenseNet121: at 32x32 its last transition reduces the map to 1x1, dense block 4 follows."""
    monai = pytest.importorskip("monai")
    torch.manual_seed(0)
    model = monai.networks.nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=4).eval()
    fcn = fcnify.convert(model, input_size=(32, 32))
    assert "cells at" in str(fcn.conversion_report.verification)
    head = nn.Sequential(model.class_layers.relu, model.class_layers.out)
    for size in [(32, 32), (64, 96), (80, 48)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            features = model.features(x)
            out = fcn(x)
        assert out.shape[2:] == features.shape[2:]
        torch.testing.assert_close(out, per_cell(head, features), rtol=1e-4, atol=1e-4)
