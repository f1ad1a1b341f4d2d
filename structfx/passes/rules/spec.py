"""Rules from a command-line string: ``"btt:rank=1,maxplus:k=2"`` (rules by comma, fields by colon); the
names are the registered ops' (``structfx.registry``)."""

from __future__ import annotations

import dataclasses
import difflib
import typing

from structfx import registry
from structfx.errors import StructfxError
from structfx.passes.rules.base import Rule


def parse_rules(text: str) -> list[Rule]:
    rules = [_parse_one(part.strip()) for part in text.split(",") if part.strip()]
    if not rules:
        raise StructfxError(f"no rules in {text!r}; e.g. 'btt:rank=1,maxplus:k=2'")
    return rules


def _parse_one(text: str) -> Rule:
    name, *assignments = text.split(":")
    rule_type = registry.spec_named(name).load("rule")  # raises, listing the names, for an unknown one
    fields = {f.name: f for f in dataclasses.fields(rule_type)}
    hints = typing.get_type_hints(rule_type)
    values = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise StructfxError(f"{name}: {assignment!r} is not FIELD=VALUE, e.g. '{name}:{next(iter(fields))}=...'")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise StructfxError(f"{name}: unknown field {key!r}; {hint}fields: {', '.join(fields)}")
        values[key] = _convert(raw, hints[key], f"{name}:{key}")
    return rule_type(**values)


def _convert(raw: str, hint, where: str):
    if raw.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    if hint is bool:
        if raw.lower() not in ("true", "false"):
            raise StructfxError(f"{where}={raw!r} must be true or false")
        return raw.lower() == "true"
    if hint is int or int in typing.get_args(hint):
        try:
            return int(raw)
        except ValueError:
            raise StructfxError(f"{where}={raw!r} must be an integer") from None
    return raw
