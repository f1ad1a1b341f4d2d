"""What every rule shares: the kind of layer it claims, the size below which it leaves layers alone, the
seed of everything it draws at random, and the checking of its fields against their declared types."""

from __future__ import annotations

import dataclasses
import types
import typing
import zlib
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from structfx.errors import StructfxError
from structfx.passes.sites import Site, SiteKind


@dataclass(frozen=True)
class Rule:
    """A frozen configuration, its fields checked against their types on construction.

    ``min_features`` (keyword-only): smaller layers are skipped and reported. ``seed`` (keyword-only): the
    seed of every random choice the rule makes (max-plus indices, random inits, fitting rows), so that
    the result never depends on, nor changes, torch's global random state.
    """

    min_features: int = field(default=64, kw_only=True)
    seed: int = field(default=0, kw_only=True)
    kind: ClassVar[SiteKind]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(self, f.name, getattr(self, f.name), hints[f.name])
        check_at_least(self, "min_features", 1)
        check_at_least(self, "seed", 0)

    def generator(self, site: Site) -> torch.Generator:
        """A CPU generator seeded by ``seed`` and the site's name: the same layer draws the same numbers
        however many other layers the model has."""
        return torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{site.name}".encode()))


def check_at_least(rule: Rule, field_name: str, low: int, note: str = "") -> None:
    """``field_name`` (an int, or None where its type allows it) must be >= ``low``."""
    value = getattr(rule, field_name)
    if value is not None and value < low:
        raise StructfxError(f"{type(rule).__name__}({field_name}={value!r}) must be at least {low}{note}")


def _check_type(rule: Rule, name: str, value: object, hint: object) -> None:
    """int (never bool), bool, None and Literal choices, as the field's annotation says."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return
        if option is bool and isinstance(value, bool):
            return
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if typing.get_origin(option) is Literal and value in typing.get_args(option) and isinstance(value, str):
            return
    expected = " or ".join(_describe(option) for option in options)
    raise StructfxError(f"{type(rule).__name__}({name}={value!r}) must be {expected}")


def _describe(option: object) -> str:
    if typing.get_origin(option) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(option)))
    return {int: "an integer", bool: "True or False", type(None): "None"}.get(option, str(option))
