"""Rule registry: each rule type maps to the function that builds its replacement layer.

Filled by ``@register_rule`` in the rule files; registering twice raises, and a missing entry lists
what is registered (torchao's habit, made loud).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from structfx.errors import StructfxError

if TYPE_CHECKING:
    from structfx.passes.rules.base import Rule
    from structfx.passes.sites import Site

Builder = Callable[["Rule", "Site"], nn.Module]
Prefit = Callable[["Rule", "list[Site]"], None]
_BUILDERS: dict[type, Builder] = {}
_PREFITS: dict[type, Prefit] = {}


def register_rule(rule_type: type) -> Callable[[Builder], Builder]:
    """Decorator: ``build(rule, site) -> nn.Module`` makes the replacement for sites of ``rule_type``."""

    def decorate(build: Builder) -> Builder:
        if rule_type in _BUILDERS:
            raise StructfxError(f"rule {rule_type.__name__} is registered twice")
        _BUILDERS[rule_type] = build
        return build

    return decorate


def builder_for(rule: object) -> Builder:
    try:
        return _BUILDERS[type(rule)]
    except KeyError:
        known = ", ".join(sorted(t.__name__ for t in _BUILDERS))
        raise StructfxError(
            f"{rule!r} is not a structfx rule; use one of: {known} (e.g. structfx.BTT(rank=1))"
        ) from None


def register_prefit(rule_type: type) -> Callable[[Prefit], Prefit]:
    """Decorator: ``prefit(rule, sites)`` prepares the replacements of many module sites at once (SPM fits
    its layers together), before the rewrite builds them one by one."""

    def decorate(prefit: Prefit) -> Prefit:
        if rule_type in _PREFITS:
            raise StructfxError(f"rule {rule_type.__name__} has two prefit functions")
        _PREFITS[rule_type] = prefit
        return prefit

    return decorate


def prefit_for(rule: object) -> Prefit | None:
    return _PREFITS.get(type(rule))


class SkipSite(Exception):
    """Raised by a builder when its rule cannot apply to this particular layer; the reason is reported."""
