"""Symbolic tracing of one module call whose arguments are tensors and numbers: nothing in the graph is
frozen from the example call."""

from __future__ import annotations

import inspect

import torch
from torch import fx, nn

from structfx import registry
from structfx.passes.recording import evaluation_mode, preserved_state, snapshot
from structfx.passes.sites import is_conv1d


class TraceFailure(Exception):
    """Why a module could not be traced; the transform falls back to its children."""


class StructfxTracer(fx.Tracer):
    """torch.fx's tracer with transformers' Conv1D and every registered op's layers kept as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_conv1d(m) or isinstance(m, registry.layer_types()):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, object]:
    """The call's named arguments, defaults filled in, in the order of the graph's placeholders.

    Raises TraceFailure for a call that passes anything through ``*args`` or ``**kwargs``.
    """
    signature = inspect.signature(module.forward)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    named = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if value:
                raise TraceFailure(f"called with arguments that only its catch-all parameter {name!r} takes")
        else:
            named[name] = value
    return named


def trace_call(module: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Trace ``module`` for calls like this one, and check that the graph reproduces the call.

    Tensors and numbers (a cache length, a position offset: values that change from call to call) stay
    inputs of the graph. A call with any other value (a flag such as None, a bool or a string, a cache
    object, a list) is not traced, since the graph would keep the example's value for every later call:
    such a module is rewritten as modules instead (transform's fallback), where its own code picks the path
    on each call.
    """
    arguments = bound_arguments(module, args, kwargs)
    for name, value in arguments.items():
        if not isinstance(value, (torch.Tensor, int, float)) or isinstance(value, bool):
            raise TraceFailure(
                f"called with {name}={_shown(value)}, which a graph would freeze to its example value "
                f"(rewritten as modules, so that calls with other values run)"
            )
    try:
        graph = StructfxTracer().trace(module)
    except Exception as e:  # tracing runs user code: any failure means "not traceable here"
        raise TraceFailure(f"symbolic tracing failed: {type(e).__name__}: {_first_line(e)}") from e
    named_placeholders = [n for n in graph.nodes if n.op == "placeholder" and not str(n.target).startswith("*")]
    for node, name in zip(named_placeholders, arguments):
        node.target = name  # keep the forward's parameter names, so keyword calls still work
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    _check_reproduces(module, gm, args, kwargs)
    return gm


def _shown(value: object) -> str:
    """A flag by its value, anything else by its type."""
    if value is None or isinstance(value, (bool, str, torch.dtype, torch.device)):
        return repr(value)
    return f"a {type(value).__name__}"


def _check_reproduces(module: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Both in eval mode, so that dropout in a model being trained does not make them differ, each on its
    own copy of the arguments (a forward may change them) and from the same parameters and buffers."""
    with torch.no_grad(), evaluation_mode(module), evaluation_mode(gm):
        try:
            with preserved_state(module):
                expected = module(*snapshot(args), **snapshot(kwargs))
                expected_buffers = {name: b.clone() for name, b in module.named_buffers()}
            with preserved_state(module), preserved_state(gm):
                got = gm(*snapshot(args), **snapshot(kwargs))
                got_buffers = dict(module.named_buffers())
        except Exception as e:
            raise TraceFailure(f"the traced graph fails on the example call: {_first_line(e)}") from e
    for name, value in expected_buffers.items():
        if not torch.equal(got_buffers[name], value):
            raise TraceFailure(f"the traced graph does not update buffer {name!r} as the module's forward does")
    expected_leaves, expected_spec = torch.utils._pytree.tree_flatten(expected)
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    same = expected_spec == got_spec and all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(expected_leaves, got_leaves)
    )
    if not same:
        raise TraceFailure(
            f"the traced graph does not reproduce the module on the example inputs "
            f"(returns {type(got).__name__}, eager {type(expected).__name__})"
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
