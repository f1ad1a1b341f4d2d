"""The op registry: one ``OpSpec`` per structured op ties everything each layer of structfx knows about it.

An op's record names its layers (``structfx.nn``), its ``torch.library`` custom op, its transform rule, the
rule's builder (and prefit), its cost for the report, its Relax converter, its schedule rules (each for the
target kind it declares) and its test cases. The CLI's rule names, the tracer's leaves, the report's cost,
the converter map, the schedule rule list and the test catalogue are all read from here, so an op is added
by writing its parts and one ``register_op`` call (``structfx.ops`` holds the built-in ones; see README
"Adding an op").

Parts are given as ``"package.module:attribute"`` (imported on first use, so that registering never imports
torch or TVM, and transform never imports the compiler) or as the object itself. Registering a name or a
custom op twice raises; a missing name raises an error that lists the registered ones (torchao's habit,
TVM's converter map).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from structfx.errors import StructfxError

Ref = object  # "package.module:attribute", or the object itself


@dataclass(frozen=True)
class OpCase:
    """One configuration every op test runs: the op's first layer built as ``layer(*args, **kwargs)`` in
    float64, inputs of shape (batch, *sample_shape). ``redraw`` names parameters and buffers drawn again,
    uniformly from (low, high) with a fixed seed, where the layer's own init is a constant that would hide
    bugs (a zero bias, a zero structuring element); names the layer lacks (a bias=False case) are skipped."""

    name: str
    args: tuple = ()
    kwargs: Mapping[str, object] = field(default_factory=dict)
    sample_shape: tuple[int, ...] = ()
    redraw: Mapping[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class OpSpec:
    """Everything about one op, each fact written once.

    - ``name``: the rule's name on the command line (``structfx compile --rules btt:rank=1``).
    - ``custom_op``: its ``torch.library`` op, ``"namespace::name"``; the converter is keyed by it.
    - ``layers``: the ``nn.Module`` classes computing it (tracer leaves, cost); cases build the first. Each
      says where its output's channels are in a class attribute ``channel_dim`` (1 or -1), which the
      channel axis of a ReLU after it is read from (``structfx.passes.axes``).
    - ``rule``: the transform rule, a frozen ``structfx.passes.Rule`` dataclass.
    - ``build``: ``build(rule, site) -> nn.Module``, the replacement for one site (raise
      ``structfx.passes.registry.SkipSite`` to leave it, with the reason).
    - ``cost``: ``cost(layer) -> structfx.passes.cost.LayerCost`` (multiply-adds per row, padding) for the
      report; parameters are counted from the layer itself.
    - ``converter``: ``convert(node, importer, target) -> relax.Var`` for ``from_exported_program``.
    - ``schedules``: ``OpScheduleRule`` classes (``structfx.lowering.ops.common``), each used on the target kind it
      declares (``target_kind``), in this order.
    - ``cases``: the ``OpCase`` configurations the reference, gradient, export and compile tests run.
    - ``prefit``: optional ``prefit(rule, sites)`` preparing all module sites at once (SPM fits together).
    """

    name: str
    custom_op: str
    layers: tuple[Ref, ...]
    rule: Ref
    build: Ref
    cost: Ref
    converter: Ref
    schedules: tuple[Ref, ...]
    cases: tuple[OpCase, ...]
    prefit: Ref | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise StructfxError(f"op name {self.name!r} must be a lower-case identifier (the CLI spells it)")
        namespace, _, op = self.custom_op.partition("::")
        if not namespace or not op:
            raise StructfxError(f"op {self.name!r}: custom_op={self.custom_op!r} is not 'namespace::name'")
        if not self.layers or not self.cases:
            raise StructfxError(f"op {self.name!r} needs at least one layer and one test case")

    @property
    def op_name(self) -> str:
        """The custom op's name without its namespace: how TVM's importer looks up its converter."""
        return self.custom_op.partition("::")[2]

    def load(self, part: str):
        """The object a part refers to, imported on first use (a tuple for ``layers`` and ``schedules``)."""
        value = getattr(self, part)
        if isinstance(value, tuple):
            return tuple(resolve(ref, f"{self.name}.{part}") for ref in value)
        return None if value is None else resolve(value, f"{self.name}.{part}")


_RESOLVED: dict[str, object] = {}  # "module:attribute" -> the object (the tracer asks per module call)


def resolve(ref: Ref, where: str = "") -> object:
    """``"package.module:attribute"`` imported, anything else as it is.

    Raises StructfxError naming the part when the module or attribute does not exist.
    """
    if not isinstance(ref, str):
        return ref
    if ref in _RESOLVED:
        return _RESOLVED[ref]
    module_name, sep, attribute = ref.partition(":")
    if not sep or not attribute:
        raise StructfxError(f"{where}: {ref!r} is not 'package.module:attribute'")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise StructfxError(f"{where}: cannot import {ref!r}: {e}") from e
    _RESOLVED[ref] = value
    return value


def ref_name(ref: Ref) -> str:
    """The attribute name a part has, without importing it."""
    return ref.rpartition(":")[2] if isinstance(ref, str) else ref.__name__


_SPECS: dict[str, OpSpec] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("structfx.ops")


def register_op(spec: OpSpec) -> OpSpec:
    """Add an op. Raises StructfxError when its name, its custom op's name (TVM keys converters by it)
    or the class name of its rule or a layer (``structfx`` exports them by it) is registered already."""
    _load_builtins()
    names = {spec.name, spec.op_name, *_class_names(spec)}
    for other in _SPECS.values():
        if names & {other.name, other.op_name, *_class_names(other)}:
            raise StructfxError(
                f"op {spec.name!r} ({spec.custom_op}) clashes with the registered op {other.name!r} "
                f"({other.custom_op}): names, custom op names and rule and layer class names must be unique"
            )
    _SPECS[spec.name] = spec
    return spec


def _class_names(spec: OpSpec) -> list[str]:
    return [ref_name(spec.rule), *map(ref_name, spec.layers)]


def unregister_op(name: str) -> None:
    """Remove an op added by ``register_op`` (tests, notebooks)."""
    spec_named(name)
    del _SPECS[name]


def specs() -> list[OpSpec]:
    """Every registered op, the built-in ones first, in registration order."""
    _load_builtins()
    return list(_SPECS.values())


def spec_named(name: str) -> OpSpec:
    """The op registered as ``name`` (any case). Raises StructfxError listing the registered names."""
    _load_builtins()
    spec = _SPECS.get(name.lower())
    if spec is None:
        raise StructfxError(f"unknown rule {name!r}; use one of: {', '.join(_SPECS)}")
    return spec


def spec_of_rule(rule_type: type) -> OpSpec | None:
    """The op whose transform rule is ``rule_type``."""
    return next((spec for spec in specs() if spec.load("rule") is rule_type), None)


def layer_types() -> tuple[type, ...]:
    """The layers of every registered op."""
    return tuple(layer for spec in specs() for layer in spec.load("layers"))


def spec_of_layer(module: object) -> OpSpec | None:
    """The op one of whose layers ``module`` is an instance of."""
    return next((spec for spec in specs() if isinstance(module, spec.load("layers"))), None)


def public_names(part: str) -> dict[str, OpSpec]:
    """Class name -> op, for every registered op's rule (``part="rule"``) or layers (``"layers"``): what
    ``structfx``, ``structfx.passes`` and ``structfx.nn`` export, without importing them."""
    refs = {"rule": lambda spec: (spec.rule,), "layers": lambda spec: spec.layers}[part]
    return {ref_name(ref): spec for spec in specs() for ref in refs(spec)}


def export(module: str, name: str, part: str) -> object:
    """The rule or layer called ``name`` of a registered op, for a package's ``__getattr__`` (PEP 562).

    Raises AttributeError, as a missing module attribute does, for any other name.
    """
    spec = public_names(part).get(name)
    if spec is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    if part == "rule":
        return spec.load("rule")
    return next(layer for layer in spec.load("layers") if layer.__name__ == name)
