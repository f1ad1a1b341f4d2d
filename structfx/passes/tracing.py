"""Symbolic tracing of one module call, specialised to the non-tensor arguments it was called with."""

from __future__ import annotations

import inspect

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace

from structfx import registry
from structfx.errors import StructfxError
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


#: Non-tensor arguments a trace is specialised to, FX guarding each: flags that pick a code path.
_FLAG_TYPES = (bool, str, torch.dtype, torch.device, type(None))


def trace_call(module: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Trace ``module`` for calls like this one, and check that the graph reproduces the call.

    Tensors and numbers (a cache length, a position offset: values that change from call to call) stay
    inputs of the graph; flags (None, bools, strings, dtypes, devices) are baked in, FX guarding that
    later calls pass the same. A call with any other value (a cache object, a list) is not traced, since
    the graph would silently keep the example's.
    """
    arguments = bound_arguments(module, args, kwargs)
    concrete = {}
    for name, value in arguments.items():
        if isinstance(value, _FLAG_TYPES):
            concrete[name] = value
        elif not isinstance(value, (torch.Tensor, int, float)):
            raise TraceFailure(
                f"called with {name} of type {type(value).__name__}, which a trace would freeze to its example value"
            )
    try:
        graph = StructfxTracer().trace(module, concrete_args=concrete)
    except Exception as e:  # tracing runs user code: any failure means "not traceable here"
        raise TraceFailure(f"symbolic tracing failed: {type(e).__name__}: {_first_line(e)}") from e
    named_placeholders = [n for n in graph.nodes if n.op == "placeholder" and not str(n.target).startswith("*")]
    for node, name in zip(named_placeholders, arguments):
        node.target = name  # keep the forward's parameter names, so keyword calls still work
    _explain_guards(graph, type(module).__name__, concrete)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    _check_reproduces(module, gm, args, kwargs)
    return gm


def _explain_guards(graph: fx.Graph, owner: str, flags: dict[str, object]) -> None:
    """FX's guards on the baked-in flags raise a bare AssertionError; ours raise StructfxError saying which
    module was specialised to which value, and what to do."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (torch._assert, _symbolic_trace._assert_is_none):
            continue
        name = next((n for n in flags if str(node.args[1]).startswith(f"{n} has been specialized")), None)
        if name is not None:
            message = (
                f"structfx.transform traced {owner} for {name}={flags[name]!r}, as in its example call, and it "
                f"is now called with another {name}: transform with example_inputs that call it as later calls "
                f"do, or keep it out with filter_fn"
            )
            node.target = _flag_guard if node.target is torch._assert else _none_guard
            node.args = (node.args[0], message)


def _flag_guard(same: bool, message: str) -> None:
    if not same:
        raise StructfxError(message)


def _none_guard(value: object, message: str) -> None:
    if value is not None:
        raise StructfxError(message)


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
