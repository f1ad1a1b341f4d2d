"""What every rule shares: the kind of layer it claims and the size below which it leaves layers alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from structfx.errors import StructfxError
from structfx.passes.sites import SiteKind


@dataclass(frozen=True)
class Rule:
    """A frozen configuration; ``min_features`` (keyword-only): smaller layers are skipped and reported."""

    min_features: int = field(default=64, kw_only=True)
    kind: ClassVar[SiteKind]

    def __post_init__(self) -> None:
        if self.min_features < 1:
            raise StructfxError(f"{type(self).__name__}(min_features={self.min_features}) must be at least 1")


def check_choice(rule: Rule, field_name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise StructfxError(f"{type(rule).__name__}({field_name}={value!r}) is not one of {allowed}")


def check_positive(rule: Rule, field_name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise StructfxError(f"{type(rule).__name__}({field_name}={value!r}) must be a positive integer")
