"""Before the rewrite: rules that fit their layers (SPM) fit every module layer they will claim at once.

The rewrite visits layers one at a time (graph by graph, child by child); fitting a model's dozens of small
layers one by one costs dozens of optimisations, where stacked they cost about one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from torch import nn

from structfx.errors import StructfxError
from structfx.passes.recording import Call, capped
from structfx.passes.registry import prefit_for
from structfx.passes.rules.base import Rule
from structfx.passes.sites import Site, site_from_module

FilterFn = Callable[[str, nn.Module], bool]


def filter_keeps(filter_fn: FilterFn, site: Site) -> bool:
    """``filter_fn(name, module)``, with its own failure named."""
    try:
        return bool(filter_fn(site.name, site.module))
    except Exception as e:
        raise StructfxError(f"filter_fn raised on {site.place}: {e}") from e


def prefit(
    rules: list[Rule], model: nn.Module, calls: dict[nn.Module, list[Call]], filter_fn: FilterFn | None,
    use_calibration: bool,
) -> None:
    """Hands each rule that has a prefit the module sites it will claim (first rule of the kind, wide
    enough, kept by filter_fn), with the same recorded inputs the rewrite gives them."""
    claimed: dict[Rule, list[Site]] = defaultdict(list)
    for name, module in model.named_modules():
        site = site_from_module(name, module)
        if site is None or site.kind != "dense":
            continue
        rule = next((r for r in rules if r.kind == site.kind), None)
        if rule is None or prefit_for(rule) is None or site.features < rule.min_features:
            continue
        if filter_fn is not None and not filter_keeps(filter_fn, site):
            continue
        site.samples = capped([c.args[0] for c in calls.get(module, []) if (c.batch > 0) == use_calibration and c.args])
        claimed[rule].append(site)
    for rule, sites in claimed.items():
        prefit_for(rule)(rule, sites)
