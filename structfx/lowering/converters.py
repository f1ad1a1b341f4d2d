"""Converters from our torch custom ops to Relax, for ``from_exported_program(custom_convert_map=...)``.

Each op's converter is part of its registration (``structfx.registry.OpSpec.converter``); TVM looks a
custom op up by its name without the namespace plus the overload (``"btt.default"``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from structfx import registry
from structfx.lowering.compat import Target


def converter_map(target: Target) -> dict[str, Callable]:
    """The custom_convert_map for ``target``: each registered op's converter sees the target it builds for;
    ``structfx.lowering.aten`` stands in for TVM's converters of a few ATen ops."""
    from structfx.lowering.aten import CONVERTERS as ATEN_CONVERTERS

    ours = {f"{spec.op_name}.default": functools.partial(spec.load("converter"), target=target)
            for spec in registry.specs()}
    return {**ATEN_CONVERTERS, **ours}
