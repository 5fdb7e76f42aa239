"""Every rule follows the contract of fcnify.conversion.rules.Rule: a name from its class, an identity
in its docstring, check() -> Match or Decline (with a reason), rewrite() from the match."""

import sys

import pytest
import torch
import torch.fx as fx
from torch import nn

import fcnify
from fcnify.conversion._rewrite import Context, find_head
from fcnify.conversion.rules import RULES, Decline, LinearToConv, Match, Rule
from fcnify.graph import record_shapes, second_size, trace_model


def _context(model, size=(16, 16), mode="window"):
    gm = trace_model(model)
    run = record_shapes(gm, torch.randn(2, 3, *size))
    run2 = record_shapes(gm, torch.randn(2, 3, *second_size(size)))
    return gm, Context(gm, run, run2, mode, find_head(gm, run, run2))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_a_rule_is_named_after_its_class_and_states_its_identity(rule):
    assert isinstance(rule, Rule)
    assert rule.name == type(rule).__name__
    doc = sys.modules[type(rule).__module__].__doc__
    assert doc.startswith(f"{rule.name}:") and "Identity" in doc


def test_the_rules_are_tried_in_one_listed_order():
    assert [r.name for r in RULES] == [
        "GlobalPoolToWindowPool",
        "AdaptivePoolFold",
        "FlattenToIdentity",
        "LinearToConv",
        "BatchNorm1dToBatchNorm2d",
        "LayerNormToChannelLayerNorm",
        "FeatureDimToChannel",
        "PointwiseOnMaps",
    ]


def test_check_returns_a_match_or_a_decline_with_a_reason():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))
    gm, ctx = _context(net)
    nodes = {n.name: n for n in gm.graph.nodes}
    relu = LinearToConv().check(nodes["_1"], ctx)
    assert isinstance(relu, Decline) and not relu and not relu.quoted  # not a Linear: a quiet decline
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(2), nn.Linear(14 * 14, 2))  # a Linear over positions
    gm, ctx = _context(body)
    linear = next(
        n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)
    )
    declined = LinearToConv().check(linear, ctx)
    assert not declined and declined.quoted and "not a feature vector" in declined.reason
    assert str(declined).startswith("LinearToConv: ")


def test_rewrite_uses_the_match():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    fcn = fcnify.convert(net, input_size=(16, 16))
    assert [r.rule for r in fcn.conversion_report.rewrites] == [
        "GlobalPoolToWindowPool",
        "FlattenToIdentity",
        "LinearToConv",
    ]
    assert isinstance(fcn, fx.GraphModule) and isinstance(fcn, fcnify.FullyConvolutionalNet)
    assert isinstance(Match(), Match) and bool(Match())
