"""Convolutions on weights prepared once, at compile time: batch norms folded in, output channels packed.

Two rewrites of ``main``'s convolutions (``relax.nn.conv1d``/``conv2d``, NC(H)W data, OI(H)W weights,
float32), whose weights are parameters of ``main``, on the CPU:

1. An inference batch norm right after a convolution (``batch_norm(conv(x, w), gamma, beta, mean,
   var)[0]``) is folded into it: ``conv(x, w * s) + (beta - mean * s)``,
   ``s = gamma / sqrt(var + eps)`` per output channel (TVM's ``FoldBatchnormToConv2D`` does the same on
   constants only; here the statistics and weights are parameters). The bias add then fuses into the
   convolution's epilogue with the activation after it, and the batch norm kernel is gone (a
   convolution with other uses as well stays for them).
2. A convolution whose output channels per group are a multiple of the target's vector lanes becomes a
   call of ``conv_packed`` on its weight packed as (F / MR, C / groups, *kernel, MR): MR output channels
   (whole vectors) contiguous for every (input channel, kernel offset), the order the direct
   convolution's micro-kernel streams them (``structfx.lowering.schedule_rules.conv_packed``:
   vectorised over output channels, the input broadcast one element at a time; the NCHW
   direct convolution of Zhang, Franchetti & Low, "High performance zero-memory overhead direct
   convolutions", ICML 2018, on weights packed like BLIS's B panels). Depthwise convolutions (one
   channel a group) keep TVM's conv and the ``conv`` rule.

The weight computations are Relax ops on parameters alone: ``lift_conv_weights`` moves them into a
function run once, at compile time (Relax's ``LiftTransformParams``), as ``structfx.lowering.packing``
does for dense layers, and the compiled ``main`` takes the prepared weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from structfx.lowering.compat import relax, te, tirx, tvm
from structfx.lowering.lifting import fusible_with_epilogue, run_weight_computations
from structfx.lowering.ops.common import vector_lanes
from structfx.lowering.schedule_rules.matmul import registers

#: Name of the kernel, and of its accumulation block (how the schedule rule recognises it).
KERNEL, ACCUMULATE = "conv_packed", "conv_packed_accumulate"
#: Vector registers a tile leaves for its weight vectors and broadcast input (AVX2's 16 hold 12
#: accumulators); at least MIN_ACCUMULATORS keep two FMA pipes of latency 4 busy.
SPARE_REGISTERS, MIN_ACCUMULATORS = 4, 8
#: Vectors of output channels a tile holds at most where each output sums fewer than SHORT_REDUCTION
#: products (input channels per group x kernel positions). There tiles of 3 or 4 vectors ran 3 to 10x
#: slower than tiles of 2 with as many or fewer accumulators (1x1 conv 16->48 on 8x32x32, AVX2, one
#: thread: 4.5 ms with 3x4 or 3x3, 1.0-1.1 ms with 2x4 or 2x6; 32->96: 15.9 ms against 2.7 ms); over
#: ResNet's 3x3 convs (288 products and more) the wider tiles were faster (b8 2.8x eager against 2.2x).
MAX_VECTORS, SHORT_REDUCTION = 2, 128


@dataclass(frozen=True)
class Tile:
    """A register tile of the direct convolution: ``vectors`` vectors of output channels by ``rows`` x
    ``cols`` output positions (``rows`` along the second-last spatial axis, 1 for conv1d)."""

    vectors: int
    rows: int
    cols: int


def choose_tile(out_rows: int, out_cols: int, channels_per_group: int, channels: int, lanes: int,
                reduction: int = SHORT_REDUCTION) -> Tile:
    """The tile with the least wasted work per useful FMA: output channels padded to a whole number of
    ``vectors * lanes`` (which must divide ``channels_per_group`` where there are several groups),
    columns padded to a whole number of ``cols``, ``rows`` a divisor of ``out_rows``; tiles of fewer
    than MIN_ACCUMULATORS accumulators count as proportionally slower (FMA latency is exposed); ties go
    to the fewest loads per FMA. At most the target's vector registers less SPARE_REGISTERS accumulators,
    and at most MAX_VECTORS vectors of channels where ``reduction`` (products summed per output) is
    under SHORT_REDUCTION."""
    best, best_cost = None, None
    grouped = channels_per_group != channels
    most = registers(lanes) - SPARE_REGISTERS
    widest = MAX_VECTORS if reduction < SHORT_REDUCTION else most
    for vectors in range(1, min(most, widest) + 1):
        width = vectors * lanes
        if grouped and channels_per_group % width:
            continue
        padded_channels = -(-channels // width) * width
        for rows in (r for r in range(1, out_rows + 1) if out_rows % r == 0):
            for cols in range(1, min(out_cols, most) + 1):
                accumulators = vectors * rows * cols
                if accumulators > most:
                    break
                padded_cols = -(-out_cols // cols) * cols
                waste = padded_channels * padded_cols / (channels * out_cols)
                stall = max(1.0, MIN_ACCUMULATORS / accumulators)
                loads = (vectors + rows * cols) / accumulators  # per FMA: weight vectors and broadcasts
                cost = (waste * stall, loads)
                if best_cost is None or cost < best_cost:
                    best, best_cost = Tile(vectors, rows, cols), cost
    return best


def conv_packed(x: te.Tensor, packed: te.Tensor, strides, padding, dilation, groups: int, channels: int,
                tile: Tile) -> te.Tensor:
    """Direct convolution on packed weights: ``x`` (N, C, *spatial) float32, N possibly symbolic;
    ``packed`` (ceil(F / MR), C / groups, *kernel, MR); ``padding`` (low..., high...) per spatial axis as
    Relax spells it; returns (N, F, *out). The accumulation runs over the output channels padded to MR
    and the last output axis padded to a multiple of ``tile.cols`` (reading the last real column's input
    for the padded ones, never stored): the schedule's tiles then have no tail. The zero padding of ``x``
    is its own stage (``pad``)."""
    dims = len(x.shape) - 2
    mr, cg = int(packed.shape[-1]), int(packed.shape[1])
    kernel = [int(k) for k in packed.shape[2:-1]]
    sizes = [int(s) for s in x.shape[2:]]
    low, high = list(padding[:dims]), list(padding[dims:])
    out = [(sizes[a] + low[a] + high[a] - dilation[a] * (kernel[a] - 1) - 1) // strides[a] + 1 for a in range(dims)]
    padded_cols = -(-out[-1] // tile.cols) * tile.cols
    fg = channels // groups
    source = x
    if any(low) or any(high):
        source = te.compute(
            (x.shape[0], x.shape[1], *[sizes[a] + low[a] + high[a] for a in range(dims)]),
            lambda n, c, *p: tirx.if_then_else(
                tirx.all(*[tirx.all(p[a] >= low[a], p[a] < low[a] + sizes[a]) for a in range(dims)]),
                x[(n, c, *[p[a] - low[a] for a in range(dims)])], tirx.const(0.0, "float32")),
            name="pad",
        )
    rc = te.reduce_axis((0, cg), name="rc")
    rk = [te.reduce_axis((0, kernel[a]), name=f"rk{a}") for a in range(dims)]

    def accumulate(n, f, *o):
        position = [*o[:-1], tirx.min(o[-1], out[-1] - 1) if padded_cols > out[-1] else o[-1]]
        channel = (f // mr) // (fg // mr) * cg + rc if groups > 1 else rc
        spatial = [position[a] * strides[a] + rk[a] * dilation[a] for a in range(dims)]
        return te.sum(source[(n, channel, *spatial)] * packed[(f // mr, rc, *rk, f % mr)], axis=[rc, *rk])

    acc = te.compute((x.shape[0], int(packed.shape[0]) * mr, *out[:-1], padded_cols), accumulate, name=ACCUMULATE,
                     attrs={"structfx.conv_tile": [tile.rows, tile.cols]})
    return te.compute((x.shape[0], channels, *out), lambda n, f, *o: acc[(n, f, *o)], name=KERNEL)


def pack(weight: relax.Expr, mr: int) -> relax.Expr:
    """``weight`` (F, C / groups, *kernel) as (ceil(F / mr), C / groups, *kernel, mr), channels past F zero."""
    shape = [int(d) for d in weight.ty.shape]
    blocks = -(-shape[0] // mr)
    if blocks * mr != shape[0]:
        weight = relax.op.nn.pad(weight, [0, blocks * mr - shape[0]] + [0, 0] * (len(shape) - 1))
    split = relax.op.reshape(weight, [blocks, mr, *shape[1:]])
    return relax.op.permute_dims(split, [0, *range(2, len(shape) + 1), 1])


_LAYOUTS = {"relax.nn.conv1d": ("NCW", "OIW"), "relax.nn.conv2d": ("NCHW", "OIHW")}


def _plain_conv(call, weights) -> bool:
    """Whether ``call`` is a float32 conv1d/conv2d in NC(H)W/OI(H)W layouts, static except for the
    batch, on a weight that is one of ``weights``."""
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op) or call.op.name not in _LAYOUTS:
        return False
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout) != _LAYOUTS[call.op.name] or attrs.out_layout != attrs.data_layout:
        return False
    x, weight = call.args
    if not any(weight.same_as(w) for w in weights) or str(attrs.out_dtype) not in ("", "float32"):
        return False
    if x.ty.dtype != "float32" or weight.ty.dtype != "float32" or x.ty.shape is None:
        return False
    return all(isinstance(d, tirx.IntImm) for d in list(x.ty.shape)[1:])


@relax.expr_functor.mutator
class _BatchNormFolder(relax.PyExprMutator):
    """``batch_norm(conv(x, w), gamma, beta, mean, var)[0]`` (inference) as ``conv(x, w * s) + (beta -
    mean * s)``, ``s = gamma / sqrt(var + eps)``, for a conv on one of ``weights``."""

    def __init__(self, mod, weights: list) -> None:
        super().__init__(mod)
        self.weights, self.rewritten = weights, False

    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        op = super().visit_tuple_getitem_(op)
        if op.index != 0 or not isinstance(op.tuple_value, relax.Var):
            return op
        norm = self.lookup_binding(op.tuple_value)
        if not isinstance(norm, relax.Call) or not isinstance(norm.op, tvm.ir.Op):
            return op
        if norm.op.name != "relax.nn.batch_norm" or bool(norm.attrs.training) or int(norm.attrs.axis) != 1:
            return op
        conv = self.lookup_binding(norm.args[0]) if isinstance(norm.args[0], relax.Var) else None
        if not _plain_conv(conv, self.weights):
            return op
        x, weight = conv.args
        gamma, beta, mean, var = norm.args[1:]
        epsilon = relax.const(float(norm.attrs.epsilon), "float32")
        scale = self.builder_.emit(relax.op.divide(gamma, relax.op.sqrt(relax.op.add(var, epsilon))))
        rank, channels = len(weight.ty.shape), int(weight.ty.shape[0])
        folded = self.builder_.emit(relax.op.multiply(weight, relax.op.reshape(scale, [channels] + [1] * (rank - 1))))
        bias = relax.op.subtract(beta, relax.op.multiply(mean, scale))
        out = self.builder_.emit(relax.Call(conv.op, (x, folded), conv.attrs))
        self.rewritten = True
        return relax.op.add(out, relax.op.reshape(bias, [1, channels] + [1] * (rank - 2)))


@relax.expr_functor.mutator
class _ConvPacker(relax.PyExprMutator):
    """A conv on one of ``weights`` whose output channels per group are whole vectors as ``conv_packed``
    on its weight packed."""

    def __init__(self, mod, weights: list, lanes: int) -> None:
        super().__init__(mod)
        self.weights, self.lanes, self.rewritten = weights, lanes, False

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not _plain_conv(call, self.weights):
            return call
        x, weight = call.args
        attrs = call.attrs
        groups, channels = int(attrs.groups), int(weight.ty.shape[0])
        if (channels // groups) % self.lanes:
            return call
        out = [int(d) for d in list(call.ty.shape)[2:]]
        reduction = math.prod(int(d) for d in list(weight.ty.shape)[1:])  # input channels per group x kernel
        tile = choose_tile(out[-2] if len(out) > 1 else 1, out[-1], channels // groups, channels, self.lanes,
                           reduction)
        packed = self.builder_.emit(pack(weight, tile.vectors * self.lanes))
        strides, padding = [int(s) for s in attrs.strides], [int(p) for p in attrs.padding]
        dilation = [int(d) for d in attrs.dilation]
        kernel = self.builder_.call_te(
            lambda data, weights: conv_packed(data, weights, strides, padding, dilation, groups, channels, tile),
            x, packed, primfunc_name_hint=KERNEL)
        self.rewritten = True
        return fusible_with_epilogue(self.builder_, kernel)


def _on_parameters(func: relax.Function, params: list) -> list:
    """``params`` and the vars of ``func`` bound to values computed from them (and constants) alone."""
    found = list(params)
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding) and all(
                    any(v.same_as(p) for p in found) for v in relax.analysis.free_vars(binding.value)):
                found.append(binding.var)
    return found


def _rewrite_main(mod, mutator_class, *args):
    """``mod`` with ``main`` rewritten by the mutator, or ``mod`` itself where it rewrote nothing."""
    main = mod["main"]
    weights = _on_parameters(main, main.params[int(main.attrs["num_input"]):])
    mutator = mutator_class(mod, weights, *args)
    rewritten = mutator.visit_expr(main)
    if not mutator.rewritten:
        return mod
    mutator.builder_.update_func(mod.get_global_var("main"), rewritten)
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())


def prepare_conv_weights(mod, target):
    """``mod`` with its ``main``'s batch norms folded into the convolutions before them and convolutions
    on packed weights (see the module docstring); the weight computations are still in ``main``."""
    mod = _rewrite_main(mod, _BatchNormFolder)
    return _rewrite_main(mod, _ConvPacker, vector_lanes(target))


def lift_conv_weights(mod, params: list, target) -> tuple:
    """``prepare_conv_weights`` of ``mod`` (``main`` with ``num_input`` inputs followed by the parameters
    ``params``, TVM tensors in order), the weight computations run now: (module whose ``main`` takes the
    prepared weights, those weights). A module without a convolution to prepare is returned as it is."""
    prepared = prepare_conv_weights(mod, target)
    if prepared is mod:
        return mod, params
    return run_weight_computations(prepared, params)
