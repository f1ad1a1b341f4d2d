"""ReLU, ``F.linear`` and pool calls in a forward that cannot be traced: made into modules, so that the
fallback can swap them.

Symbolic tracing stops at data-dependent control flow (and is not tried on a part called with flags, see
tracing.py), and the fallback swaps modules only: ``F.relu(x)``, ``torch.relu(x)``, ``x.relu()`` (and their
in-place forms), ``F.linear(x, self.weight, self.bias)`` and ``F.max_pool2d(x, 2)`` (the pools of sites.py,
their other arguments literals) written in such a forward would be lost. Here the forward's source is
rewritten (Python's ``ast``) so that each of those calls becomes ``self.<name>(x)`` on a new child: an
``nn.ReLU`` (``inplace=True`` for the in-place forms, which return their mutated input as the calls did),
the pool's module, or an ``nn.Linear`` that takes over the module's own weight and bias parameters (the
same tensors, moved under the new child; every call on one weight shares one child). The rest of the
code, its control flow included, is untouched. The module keeps its class; only its ``forward`` is the
rewritten one. The region is then proven like any other (proof.py).

Forwards without source, decorated ones (the decorator would be lost) and calls with other arguments are
left alone (a ReLU whose ``inplace`` is computed, too), and so are ``F.linear`` calls whose weight is not
the module's own parameter, whose parameters the forward also reads some other way (a transpose, another
op), or whose weight is used with two biases: ``unconverted`` says why for each.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import sys
import textwrap
import types
from collections import Counter
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import nn
from torch.fx.operator_schemas import normalize_function

from structfx.passes.sites import POOL_FUNCTIONS, RELU_FUNCTIONS, RELU_METHODS

LINEAR_FUNCTIONS = (F.linear,)


@dataclass
class Rewritten:
    """What ``calls_as_modules`` did to a module, and how to take it back."""

    module: nn.Module
    children: dict[str, nn.Module]  # the new children by name, in the forward's order
    parameters: dict[str, nn.Parameter]  # the module's own parameters before (moved ones among them)
    unconverted: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, the call, why left alone)

    def untouched(self) -> bool:
        """True while every new child is still the one made here (none was replaced)."""
        return all(self.module._modules.get(name) is child for name, child in self.children.items())

    def undo(self) -> None:
        del self.module.forward
        for name in self.children:
            delattr(self.module, name)
        self.module._parameters.clear()
        self.module._parameters.update(self.parameters)


def calls_as_modules(module: nn.Module, kinds: set[str]) -> Rewritten | None:
    """Rewrites ``module.forward`` in place, making its calls of each kind in ``kinds`` ("relu", "dense", "pool")
    children; None when there was nothing to rewrite (no call found, or a forward that cannot be rewritten).
    A result without children rewrote nothing, and lists the calls left alone."""
    function = type(module).forward
    if not isinstance(function, types.FunctionType) or "forward" in module.__dict__ or hasattr(function, "__wrapped__"):
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):  # no source (built in, made by exec), or not a whole def
        return None
    definition = tree.body[0]
    if not isinstance(definition, ast.FunctionDef) or definition.decorator_list or not definition.args.args:
        return None
    rewriter = _CallsAsModules(function.__globals__, definition.args.args[0].arg, module, kinds)
    rewriter.plan(definition)
    rewriter.visit(definition)
    if not rewriter.added:  # the forward stays the class's own: only what was left alone, and why
        return Rewritten(module, {}, dict(module._parameters), rewriter.unconverted) if rewriter.unconverted else None
    free = dict(zip(function.__code__.co_freevars, (c.cell_contents for c in function.__closure__ or ())))
    free.setdefault("__class__", type(module))
    try:
        new_forward = RewrittenForward(module, ast.unparse(tree), function.__module__, free)
    except (SyntaxError, ValueError, TypeError, NameError, KeyError):  # e.g. globals no longer importable
        return None
    rewritten = Rewritten(module, dict(rewriter.added), dict(module._parameters), rewriter.unconverted)
    for name, child in rewriter.added:
        for parameter_name in rewriter.moved.get(name, ()):
            del module._parameters[parameter_name]
        module.add_module(name, child)
    module.forward = new_forward
    return rewritten


class _CallsAsModules(ast.NodeTransformer):
    def __init__(self, namespace: dict, self_name: str, module: nn.Module, kinds: set[str]) -> None:
        self.namespace, self.self_name, self.module, self.kinds = namespace, self_name, module, kinds
        self.added: list[tuple[str, nn.Module]] = []
        self.moved: dict[str, tuple[str, ...]] = {}  # new child -> the module's parameters it takes over
        self.linears: dict[int, tuple[str, str | None]] = {}  # id(call node) -> (weight, bias) names, if converted
        self.by_parameters: dict[tuple[str, str | None], str] = {}  # (weight, bias) -> the child that computes it
        self.unconverted: list[tuple[str, str, str]] = []

    def plan(self, definition: ast.FunctionDef) -> None:
        """Which F.linear calls become children: those on the module's own parameters, read nowhere else."""
        if "dense" not in self.kinds:
            return
        reads = Counter(
            node.attr for node in ast.walk(definition)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self.self_name
        )
        found: list[tuple[ast.Call, tuple[str, str | None]]] = []
        for node in ast.walk(definition):
            if isinstance(node, ast.Call) and self._resolve(node.func) in LINEAR_FUNCTIONS:
                names = self._linear_parameters(node)
                if isinstance(names, str):
                    self.unconverted.append(("dense", ast.unparse(node), names))
                else:
                    found.append((node, names))
        uses = Counter(name for _, names in found for name in set(names) if name is not None)
        pairs = {names for _, names in found}
        for node, names in found:
            weight, bias = names
            why = None
            if any(name is not None and uses[name] != reads[name] for name in names):
                why = "its weight or bias is also read some other way in the forward: kept"
            elif sum(weight in pair or (bias is not None and bias in pair) for pair in pairs) > 1:
                why = "its weight or bias is used with another bias or weight too: kept"
            if why is None:
                self.linears[id(node)] = names
            else:
                self.unconverted.append(("dense", ast.unparse(node), why))

    def _linear_parameters(self, node: ast.Call) -> tuple[str, str | None] | str:
        """(weight, bias) names of an ``F.linear`` call on the module's own parameters, else why not."""
        keywords = {k.arg: k.value for k in node.keywords}
        if None in keywords or any(isinstance(a, ast.Starred) for a in node.args) or len(node.args) > 3:
            return "its arguments are unpacked (*args, **kwargs): kept"
        arguments = dict(zip(("input", "weight", "bias"), node.args)) | keywords
        if set(arguments) - {"input", "weight", "bias"} or "input" not in arguments or "weight" not in arguments:
            return "not a call F.linear(input, weight, bias): kept"
        weight = self._own_parameter(arguments["weight"], 2)
        bias_node = arguments.get("bias")
        no_bias = bias_node is None or (isinstance(bias_node, ast.Constant) and bias_node.value is None)
        bias = None if no_bias else self._own_parameter(bias_node, 1)
        if weight is None or (not no_bias and bias is None):
            return "its weight or bias is not a parameter of the module itself (self.<name>): kept"
        return weight, bias

    def _own_parameter(self, expression: ast.expr, dim: int) -> str | None:
        if not (
            isinstance(expression, ast.Attribute) and isinstance(expression.value, ast.Name)
            and expression.value.id == self.self_name
        ):
            return None
        parameter = self.module._parameters.get(expression.attr)
        return expression.attr if parameter is not None and parameter.dim() == dim else None

    def visit_Call(self, node: ast.Call) -> ast.AST:
        names = self.linears.get(id(node))
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not node.args:
            node.args = [ast.Name("__class__", ast.Load()), ast.Name(self.self_name, ast.Load())]
            return node
        if names is not None:
            argument = node.args[0] if node.args else next(k.value for k in node.keywords if k.arg == "input")
            name = self.by_parameters.get(names) or self._linear_child(*names)
            self.by_parameters[names] = name
        elif (found := self._relu(node) if "relu" in self.kinds else None) is not None:
            argument, inplace = found
            name = self._fresh_name("relu")
            self.added.append((name, nn.ReLU(inplace=inplace)))
        elif (pool := self._pool(node) if "pool" in self.kinds else None) is not None:
            argument, module = pool
            name = self._fresh_name("pool")
            self.added.append((name, module))
        else:
            return node
        call = ast.Call(ast.Attribute(ast.Name(self.self_name, ast.Load()), name, ast.Load()), [argument], [])
        return ast.copy_location(call, node)

    def _linear_child(self, weight: str, bias: str | None) -> str:
        """An nn.Linear holding the module's own weight and bias (the very parameters)."""
        parameter = self.module._parameters[weight]
        linear = nn.Linear(parameter.shape[1], parameter.shape[0], bias=bias is not None, device="meta")
        linear.weight = parameter
        linear.bias = None if bias is None else self.module._parameters[bias]
        name = self._fresh_name("linear")
        self.added.append((name, linear))
        self.moved[name] = (weight,) if bias is None else (weight, bias)
        return name

    def _relu(self, node: ast.Call) -> tuple[ast.expr, bool] | None:
        """(the tensor argument, in place?) for a ReLU call in one of its spellings, else None."""
        target = self._resolve(node.func)
        if target is not None and target in RELU_FUNCTIONS and node.args:
            extra = [*node.args[1:], *(k.value for k in node.keywords if k.arg == "inplace")]
            if (
                len(node.args) > 2 or any(k.arg not in ("inplace",) for k in node.keywords)
                or not all(isinstance(e, ast.Constant) and isinstance(e.value, bool) for e in extra)
            ):
                self.unconverted.append(("relu", ast.unparse(node), "its inplace argument is not a literal: kept"))
                return None
            return node.args[0], RELU_FUNCTIONS[target] or any(e.value for e in extra)
        if (
            target is None and isinstance(node.func, ast.Attribute) and node.func.attr in RELU_METHODS
            and not node.args and not node.keywords
        ):
            return node.func.value, RELU_METHODS[node.func.attr]
        return None

    def _pool(self, node: ast.Call) -> tuple[ast.expr, nn.Module] | None:
        """(the tensor argument, the equivalent pool module) for a functional pool whose other arguments are
        all literals, else None."""
        target = self._resolve(node.func)
        if target not in POOL_FUNCTIONS or not node.args or any(isinstance(a, ast.Starred) for a in node.args):
            return None
        try:
            args = [ast.literal_eval(a) for a in node.args[1:]]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:  # an argument computed at run time
            return None
        if None in kwargs:
            return None
        normalized = normalize_function(target, (None, *args), kwargs, normalize_to_only_use_kwargs=True)
        if normalized is None:
            return None
        literal = dict(normalized.kwargs)
        literal.pop("input")
        return node.args[0], POOL_FUNCTIONS[target](literal)

    def _resolve(self, expression: ast.expr) -> object | None:
        """The object a dotted name (``F.relu``, ``torch.nn.functional.relu``) names in the forward's module."""
        if isinstance(expression, ast.Name):
            return self.namespace.get(expression.id, getattr(builtins, expression.id, None))
        if isinstance(expression, ast.Attribute):
            owner = self._resolve(expression.value)
            if isinstance(owner, types.ModuleType):
                return getattr(owner, expression.attr, None)
        return None

    def _fresh_name(self, base: str) -> str:
        taken = {name for name, _ in self.added}
        index, name = 0, base
        while hasattr(self.module, name) or name in taken:
            index += 1
            name = f"{base}_{index}"
        return name


class RewrittenForward:
    """``module.forward`` after the rewrite, called as the bound method it replaces (same signature).

    Pickled and deep-copied as its source, the name of the Python module whose globals it reads and its
    closure's values, and compiled again from them, so that a saved and loaded model keeps its rewritten
    calls (a bound method would pickle as the class's own forward, silently dropping them).
    """

    def __init__(self, module: nn.Module, source: str, namespace: str, free: dict[str, object]) -> None:
        self.module, self.source, self.namespace, self.free = module, source, namespace, free
        self.function = _compiled(source, namespace, free)
        self.__signature__ = inspect.signature(types.MethodType(self.function, module))

    @property
    def __func__(self) -> types.FunctionType:
        return self.function

    @property
    def __self__(self) -> nn.Module:
        return self.module

    def __getattr__(self, name: str):
        """The function's attributes (``__code__``, ``__name__``...), as a bound method gives them (tools
        such as torch.export read them)."""
        if name in ("function", "module"):  # not set yet (while unpickling)
            raise AttributeError(name)
        return getattr(self.function, name)

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)

    def __reduce__(self):
        return RewrittenForward, (self.module, self.source, self.namespace, self.free)


def _compiled(source: str, namespace: str, free: dict[str, object]) -> types.FunctionType:
    """The rewritten function from its source, with the globals of the Python module ``namespace`` and the
    closure ``free`` (``__class__`` for ``super()``)."""
    definition = ast.parse(source).body[0]
    names = list(free)
    factory = ast.FunctionDef(
        name="_structfx_factory",
        args=ast.arguments(posonlyargs=[], args=[ast.arg(n) for n in names], kwonlyargs=[], kw_defaults=[],
                           defaults=[]),
        body=[definition, ast.Return(ast.Name(definition.name, ast.Load()))],
        decorator_list=[], returns=None, type_params=[],
    )
    tree = ast.fix_missing_locations(ast.Module([factory], type_ignores=[]))
    scope = dict(sys.modules[namespace].__dict__)
    owner = free["__class__"]
    exec(compile(tree, f"<structfx: {owner.__qualname__}.forward, calls as modules>", "exec"), scope)
    return scope["_structfx_factory"](*free.values())
