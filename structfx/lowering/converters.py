"""Converters from our torch custom ops to Relax, for ``from_exported_program(custom_convert_map=...)``.

Filled by ``@register_converter("structfx::op")`` in ``structfx/lowering/ops/``; TVM looks a custom op
up by its name without the namespace plus the overload (``"btt.default"``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from structfx.errors import StructfxError
from structfx.lowering.compat import Target

Converter = Callable  # (node, importer, target) -> relax.Var
_CONVERTERS: dict[str, Converter] = {}


def register_converter(op_name: str) -> Callable[[Converter], Converter]:
    namespace, _, name = op_name.partition("::")
    if namespace != "structfx" or not name:
        raise StructfxError(f"converters are registered as 'structfx::<op>', got {op_name!r}")
    key = f"{name}.default"

    def decorate(convert: Converter) -> Converter:
        if key in _CONVERTERS:
            raise StructfxError(f"a converter for {op_name} is registered twice")
        _CONVERTERS[key] = convert
        return convert

    return decorate


def converter_map(target: Target) -> dict[str, Callable]:
    """The custom_convert_map for ``target``: each of our ops' converters sees the target it builds for;
    ``structfx.lowering.aten`` stands in for TVM's converters of a few ATen ops."""
    import structfx.lowering.ops  # noqa: F401  (registers every op's converter)
    from structfx.lowering.aten import CONVERTERS as ATEN_CONVERTERS

    ours = {key: functools.partial(convert, target=target) for key, convert in _CONVERTERS.items()}
    return {**ATEN_CONVERTERS, **ours}
