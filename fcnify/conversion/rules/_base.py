"""The contract every rewrite rule follows, in the spirit of onnxscript's ``RewriteRuleClassBase``.

A rule is a class; its name is the class name (``LinearToConv``: what it turns into what).
The rewriter asks each rule, in the order of :data:`fcnify.conversion.rules.RULES`:

* ``check(node, ctx)`` -- a :class:`Match` holding what the rule found (the rewrite needs
  nothing else), or a :class:`Decline` saying why not, for this node;
* ``rewrite(node, ctx, match)`` -- builds the node's replacement in ``ctx.graph`` from the
  match, records what it did, and returns the new value.

A rule's module docstring states the identity it relies on. A decline is either quiet (the
node is not of the rule's kind: a ``Linear`` rule looking at a ReLU) or quoted: the node is of
the rule's kind but a precondition fails; when no rule converts a node, the refusal quotes
those reasons.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Union

import torch.fx as fx

from .._rewrite import Context

__all__ = ["Rule", "Match", "Decline", "Found"]


class Match:
    """What a rule's :meth:`Rule.check` found (true in a boolean context); rules subclass it."""


@dataclasses.dataclass(frozen=True)
class Decline:
    """A rule does not apply to a node (false in a boolean context).

    Attributes:
        rule: the rule's name.
        node: the node's name.
        reason: why, in words for the user.
        quoted: whether a refusal quotes it (False: the node is not of the rule's kind at all).
    """

    rule: str
    node: str
    reason: str
    quoted: bool = True

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason}"


Found = Union[Match, Decline]


class Rule(abc.ABC):
    """A rewrite of one kind of head node into its per-position equivalent."""

    @property
    def name(self) -> str:
        """The class name, as the conversion report shows it."""
        return type(self).__name__

    @abc.abstractmethod
    def check(self, node: fx.Node, ctx: Context) -> Found:
        """A :class:`Match` when the rule applies to ``node``, else a :class:`Decline`."""

    @abc.abstractmethod
    def rewrite(self, node: fx.Node, ctx: Context, match: Match) -> fx.Node:
        """The converted graph's value for ``node``, built from what :meth:`check` found."""

    def decline(self, node: fx.Node, reason: str) -> Decline:
        """The node is of this rule's kind, but a precondition fails (a refusal quotes ``reason``)."""
        return Decline(self.name, node.name, reason)

    def skip(self, node: fx.Node) -> Decline:
        """The node is not of this rule's kind."""
        return Decline(self.name, node.name, "not a node of its kind", quoted=False)

    def record(self, ctx: Context, node: fx.Node, before: str, after: str) -> None:
        """Report the rewrite of ``node`` (``before -> after``) under this rule's name."""
        ctx.record(self.name, node, before, after)

    def __repr__(self) -> str:
        return f"{self.name}()"
