"""torch's start value for max and min reductions and max pooling: -inf and +inf, not the finite extremes.

TVM's ``max`` and ``min`` reductions and its pools start from the dtype's lowest (or highest) finite
value, and pad with it: ``amax`` of a row of -inf (a fully masked row), or max pooling over a window of
-inf, gave -3.4e38 where torch gives -inf (and ``amax(x) - x`` then gave inf where torch gives NaN).

This pass, on scheduled kernels (after the schedule rules and tuning have recognised TVM's reducers, which
they do by their finite identities), starts every max (min) accumulator whose values are the kernel's
output from -inf (+inf), with the partial accumulators that feed it (rfactor's lanes) and the padding
(``if_then_else(in bounds, x, lowest)``) read by it. Accumulators that are computed on inside the kernel
(softmax's and logsumexp's row max, from which they subtract) keep the finite start, which their
arithmetic on all -inf rows relies on.
"""

from __future__ import annotations

import tvm_ffi

from structfx.lowering.compat import TensorLoad, tirx, tvm

#: The reducer of an accumulator: its update's op, and the sign of the infinity it starts from.
SIGNS = {tirx.Max: -1.0, tirx.Min: 1.0}


def infinite_identities(mod):
    """``mod`` with the max and min accumulators of its PrimFuncs' outputs starting from -inf and +inf (see
    the module docstring). Relax functions are left as they are. Returns a new IRModule (``mod`` is
    unchanged)."""
    changed = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            mapped = _with_infinite_identities(func)
            if not mapped.same_as(func):
                changed[gv] = mapped
    if not changed:
        return mod
    return tvm.IRModule({**dict(mod.functions_items()), **changed}, attrs=mod.attrs)


def _key(buffer) -> int:
    return buffer.__chandle__()


def _update(store):
    """(reducer type, the other operand) where ``store`` is ``B[i] = max(B[i], value)`` (or min) of a float
    buffer ``B``; None otherwise."""
    value = store.value
    if type(value) not in SIGNS or "float" not in str(value.ty):
        return None
    for mine, other in ((value.a, value.b), (value.b, value.a)):
        if isinstance(mine, TensorLoad) and mine.source.same_as(store.buffer):
            return type(value), other
    return None


def _loaded(expr) -> list:
    loads = []

    def visit(load, visitor):
        loads.append(load.source)
        visitor.default_visit(load)

    tvm_ffi.structural_visit(expr, [(TensorLoad, visit)])
    return loads


def _with_infinite_identities(func):
    stores = []

    def visit(store, visitor):
        stores.append(store)
        visitor.default_visit(store)

    tvm_ffi.structural_visit(func.body, [(tirx.BufferStore, visit)])
    updates = [(store, found) for store in stores if (found := _update(store)) is not None]
    reducers = {_key(store.buffer): reducer for store, (reducer, _) in updates}
    outputs = {_key(param) for param in func.params}
    marked = {key: reducer for key, reducer in reducers.items() if key in outputs}
    padded: dict = {}
    grown = True
    while grown:
        grown = False
        for store, (reducer, other) in updates:
            if marked.get(_key(store.buffer)) is not reducer:
                continue
            for buffer in _loaded(other):
                key = _key(buffer)
                if reducers.get(key) is reducer and key not in marked:
                    marked[key], grown = reducer, True
                elif key not in reducers:
                    padded[key] = reducer
    if not marked:
        return func

    def rewrite(store):
        reducer = marked.get(_key(store.buffer)) or padded.get(_key(store.buffer))
        if reducer is None:
            return store
        value = _infinite_padding(store.value, SIGNS[reducer])
        if _key(store.buffer) in marked and _is_finite_extreme(value, SIGNS[reducer]):
            value = tirx.FloatImm(str(value.ty), SIGNS[reducer] * float("inf"))
        return store if value.same_as(store.value) else tirx.BufferStore(store.buffer, value, store.indices)

    return tvm_ffi.structural_map(func, [(tirx.BufferStore, rewrite)], order="post")


def _is_finite_extreme(value, sign: float) -> bool:
    """``value`` is the constant TVM starts a reduction from: the lowest finite float (sign -1) or the
    highest (sign 1) of its dtype."""
    if not isinstance(value, tirx.FloatImm):
        return False
    dtype = str(value.ty)
    extreme = tirx.min_value(dtype) if sign < 0 else tirx.max_value(dtype)
    return value.value == extreme.value


def _infinite_padding(expr, sign: float):
    """``expr`` with every ``if_then_else(c, x, extreme)`` (TVM's padding of a pool) padding with the
    infinity of ``sign`` instead."""
    op = tvm.ir.Op.get("prim.if_then_else")

    def rewrite(call):
        if not call.op.same_as(op) or not _is_finite_extreme(call.args[2], sign):
            return call
        infinity = tirx.FloatImm(str(call.args[2].ty), sign * float("inf"))
        return tirx.if_then_else(call.args[0], call.args[1], infinity)

    return tvm_ffi.structural_map(expr, [(tvm.ir.expr.Call, rewrite)], order="post")
