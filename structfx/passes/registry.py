"""What transform looks up per rule: the function building its replacement layer and its prefit, both
registered with the rule's op (``structfx.registry.OpSpec``: ``build``, ``prefit``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from structfx import registry
from structfx.errors import StructfxError

if TYPE_CHECKING:
    from structfx.passes.rules.base import Rule
    from structfx.passes.sites import Site

Builder = Callable[["Rule", "Site"], nn.Module]
Prefit = Callable[["Rule", "list[Site]"], None]


def builder_for(rule: object) -> Builder:
    """``build(rule, site) -> nn.Module`` of the op whose rule ``rule`` is.

    Raises StructfxError listing the registered rules for anything else.
    """
    spec = registry.spec_of_rule(type(rule))
    if spec is None:
        known = ", ".join(sorted(registry.ref_name(s.rule) for s in registry.specs()))
        raise StructfxError(f"{rule!r} is not a structfx rule; use one of: {known} (e.g. structfx.BTT(rank=1))")
    return spec.load("build")


def prefit_for(rule: object) -> Prefit | None:
    """``prefit(rule, sites)``, which prepares the replacements of many module sites at once (SPM fits its
    layers together) before the rewrite builds them one by one; None for rules without one."""
    spec = registry.spec_of_rule(type(rule))
    return None if spec is None else spec.load("prefit")


class SkipSite(Exception):
    """Raised by a builder when its rule cannot apply to this particular layer; the reason is reported."""
