"""ReLU calls in a forward that cannot be traced: made into modules, so that the fallback can swap them.

Symbolic tracing stops at data-dependent control flow, and the fallback swaps modules only: ``F.relu(x)``,
``torch.relu(x)``, ``x.relu()`` (and their in-place forms) written in such a forward would be lost. Here the
forward's source is rewritten (Python's ``ast``) so that each of those calls becomes ``self.<relu_n>(x)``
on a new ``nn.ReLU`` (``inplace=True`` for the in-place forms, which return their mutated input as the calls
did); the rest of the code, its control flow included, is untouched. The module keeps its class; only its
``forward`` is the rewritten one. The region is then proven like any other (proof.py).

Forwards without source, decorated ones (the decorator would be lost) and calls with other arguments are
left alone.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
import types

from torch import nn

from structfx.passes.sites import RELU_FUNCTIONS, RELU_METHODS


def relu_calls_as_modules(module: nn.Module) -> list[str] | None:
    """Rewrites ``module.forward`` in place; returns the names of the new ReLU children (None: nothing done)."""
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
    rewriter = _ReluCalls(function.__globals__, definition.args.args[0].arg, module)
    rewriter.visit(definition)
    if not rewriter.added:
        return None
    try:
        new_forward = _compiled(tree, function, type(module))
    except (SyntaxError, ValueError, TypeError, NameError):  # e.g. a closure over something no longer there
        return None
    for name, inplace in rewriter.added:
        module.add_module(name, nn.ReLU(inplace=inplace))
    module.forward = types.MethodType(new_forward, module)
    return [name for name, _ in rewriter.added]


def restore(module: nn.Module, names: list[str]) -> None:
    """Undo ``relu_calls_as_modules``."""
    del module.forward
    for name in names:
        delattr(module, name)


class _ReluCalls(ast.NodeTransformer):
    def __init__(self, namespace: dict, self_name: str, module: nn.Module) -> None:
        self.namespace, self.self_name, self.module = namespace, self_name, module
        self.added: list[tuple[str, bool]] = []

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not node.args:
            node.args = [ast.Name("__class__", ast.Load()), ast.Name(self.self_name, ast.Load())]
            return node
        found = self._relu(node)
        if found is None:
            return node
        argument, inplace = found
        name = self._fresh_name()
        self.added.append((name, inplace))
        call = ast.Call(ast.Attribute(ast.Name(self.self_name, ast.Load()), name, ast.Load()), [argument], [])
        return ast.copy_location(call, node)

    def _relu(self, node: ast.Call) -> tuple[ast.expr, bool] | None:
        """(the tensor argument, in place?) for a ReLU call in one of its spellings, else None."""
        target = self._resolve(node.func)
        if target is not None and target in RELU_FUNCTIONS and node.args:
            extra = [*node.args[1:], *(k.value for k in node.keywords if k.arg == "inplace")]
            if len(node.args) > 2 or any(k.arg not in ("inplace",) for k in node.keywords):
                return None
            if not all(isinstance(e, ast.Constant) and isinstance(e.value, bool) for e in extra):
                return None
            return node.args[0], RELU_FUNCTIONS[target] or any(e.value for e in extra)
        if (
            target is None and isinstance(node.func, ast.Attribute) and node.func.attr in RELU_METHODS
            and not node.args and not node.keywords
        ):
            return node.func.value, RELU_METHODS[node.func.attr]
        return None

    def _resolve(self, expression: ast.expr) -> object | None:
        """The object a dotted name (``F.relu``, ``torch.nn.functional.relu``) names in the forward's module."""
        if isinstance(expression, ast.Name):
            return self.namespace.get(expression.id, getattr(builtins, expression.id, None))
        if isinstance(expression, ast.Attribute):
            owner = self._resolve(expression.value)
            if isinstance(owner, types.ModuleType):
                return getattr(owner, expression.attr, None)
        return None

    def _fresh_name(self) -> str:
        taken = {name for name, _ in self.added}
        index, name = 0, "relu"
        while hasattr(self.module, name) or name in taken:
            index += 1
            name = f"relu_{index}"
        return name


def _compiled(tree: ast.Module, function: types.FunctionType, owner: type) -> types.FunctionType:
    """The rewritten function, with the original's globals and closure (``__class__`` for ``super()``)."""
    free = [name for name in function.__code__.co_freevars if name != "__class__"]
    values = dict(zip(function.__code__.co_freevars, (c.cell_contents for c in function.__closure__ or ())))
    factory = ast.FunctionDef(
        name="_structfx_factory",
        args=ast.arguments(posonlyargs=[], args=[ast.arg("__class__"), *(ast.arg(n) for n in free)], kwonlyargs=[],
                           kw_defaults=[], defaults=[]),
        body=[tree.body[0], ast.Return(ast.Name(tree.body[0].name, ast.Load()))],
        decorator_list=[], returns=None, type_params=[],
    )
    module = ast.fix_missing_locations(ast.Module([factory], type_ignores=[]))
    namespace = dict(function.__globals__)
    exec(compile(module, f"<structfx: {owner.__qualname__}.forward, ReLU calls as modules>", "exec"), namespace)
    return namespace["_structfx_factory"](values.get("__class__", owner), *(values[n] for n in free))
