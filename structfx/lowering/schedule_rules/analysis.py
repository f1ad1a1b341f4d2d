"""What a PrimFunc computes, as the CPU schedule rules need it: its matmul block and the role of each loop."""

from __future__ import annotations

from dataclasses import dataclass

from structfx.lowering.compat import Schedule, ScheduleError, TensorLoad, get_root_block, tirx, tvm


@dataclass(frozen=True)
class MatmulForm:
    """A block ``C[batch.., i, j] += A[batch.., i, k] * B[batch.., (j, k) or (k, j)]`` (batch indices of
    A and B may be constant 0, for broadcasting). Fields are positions in the block's iter vars; ``nt``
    says B is stored (.., N, K) ("NT": x times a transposed weight, Q times K^T) rather than (.., K, N)."""

    batch: tuple[int, ...]
    i: int
    j: int
    k: int
    nt: bool


def root_blocks(sch: Schedule) -> list:
    """The blocks directly under the function's root block, in program order."""
    return list(sch.get_child_blocks(get_root_block(sch)))


def reduces(block: tirx.SBlock) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars)


def single_main_block(sch: Schedule, form_of):
    """The function's one block that ``form_of`` recognises (it returns a form, else None), with no other
    block reducing: (main block, its form, whether it is the last block), or None."""
    blocks = root_blocks(sch)
    forms = [form_of(sch.get(b)) for b in blocks]
    if sum(f is not None for f in forms) != 1:
        return None
    position = next(n for n, f in enumerate(forms) if f is not None)
    if any(reduces(sch.get(b)) for n, b in enumerate(blocks) if n != position):
        return None
    return blocks[position], forms[position], position == len(blocks) - 1


def inline_epilogue(sch: Schedule, main):
    """Inline every block after ``main`` into the last one (the function's output), which is returned;
    None where one of them cannot be inlined (it is not elementwise)."""
    blocks = root_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    after = blocks[names.index(sch.get(main).name_hint) + 1:]
    for block in after[:-1]:
        try:
            sch.compute_inline(block)
        except ScheduleError:
            return None
    return after[-1] if after else None


def matmul_form(block: tirx.SBlock) -> MatmulForm | None:
    """The matmul form of ``block``, or None where it is not a float32 multiply-accumulate of two loads
    indexed by plain loop variables (or a variable clamped by ``min``, as kernels with padded tiles read)
    in any order: the output's last index is j, A reads i and k, B reads k and j, both may read any batch
    index (or 0 for a broadcast one). B's last index says the form: k is NT (then A's last must be k too),
    j is NN."""
    found = _multiply_accumulate(block)
    if found is None:
        return None
    store, product = found
    names = [iv.var for iv in block.iter_vars]
    reduce = [n for n, iv in enumerate(block.iter_vars) if iv.iter_type == tirx.IterVar.CommReduce]
    out = _positions(store.indices, names)
    if len(reduce) != 1 or out is None or len(out) < 2 or None in out:
        return None
    k, j = reduce[0], out[-1]
    operands = [_positions(load.indices, names, clamped=True) for load in (product.a, product.b)]
    if any(p is None or len(p) < 2 for p in operands):
        return None
    if j in operands[0]:
        operands.reverse()
    a, b = operands
    rows = [p for p in a if p is not None and p not in (k, j) and p not in b]
    if len(rows) > 1 and out[-2] in rows:
        rows = [out[-2]]  # the others are batch indices B broadcasts over
    if len(rows) != 1 or j in a or k not in a or k not in b or j not in b:
        return None
    i = rows[0]
    batch = tuple(p for p in out if p not in (i, j))
    if any(p is not None and p not in batch for p in a + b if p not in (i, j, k)):
        return None
    if sorted([*batch, i, j, k]) != list(range(len(names))) or len(out) != len(batch) + 2:
        return None
    nt = b[-1] == k
    if not nt and b[-1] != j or nt and a[-1] != k:
        return None
    return MatmulForm(batch, i, j, k, nt=nt)


def _multiply_accumulate(block: tirx.SBlock):
    """(store, product) of a float32 ``out += a[...] * b[...]`` block with an init, or None."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or block.init is None:
        return None
    update = store.value
    if not isinstance(update, tirx.Add) or str(update.ty) != "float32":
        return None
    product = update.b if _loads(update.a, store.buffer) else update.a if _loads(update.b, store.buffer) else None
    if not isinstance(product, tirx.Mul) or not all(isinstance(x, TensorLoad) for x in (product.a, product.b)):
        return None
    return store, product


def _loads(expr, buffer) -> bool:
    return isinstance(expr, TensorLoad) and expr.source.same_as(buffer)


def _positions(indices, names, clamped: bool = False) -> list | None:
    """Each index as the position of the iter var it is (or, with ``clamped``, that ``min`` clamps),
    None for a constant 0; None overall where an index is anything else."""
    found = []
    for index in indices:
        if isinstance(index, tirx.IntImm) and index.value == 0:
            found.append(None)
            continue
        if clamped and isinstance(index, tirx.Min):
            index = index.a
        match = [n for n, name in enumerate(names) if index.same_as(name)]
        if not match:
            return None
        found.append(match[0])
    return found


@dataclass(frozen=True)
class ConvForm:
    """A block ``out[.., f, .., x] += input[<expressions>] * weight[f, reduce..]`` (conv1d/2d, grouped
    and depthwise included, NC(H)W): ``f`` the output channel, ``x`` the innermost output axis,
    ``outer`` the other output axes (batch, rows) in output order; positions in the block's iter vars."""

    outer: tuple[int, ...]
    f: int
    x: int
    reduce: tuple[int, ...]
    order: tuple[int, ...]  # the output's axes in order


def conv_form(block: tirx.SBlock) -> ConvForm | None:
    """The convolution form of ``block``, or None where it is not a float32 one."""
    found = _multiply_accumulate(block)
    if found is None:
        return None
    store, product = found
    names = [iv.var for iv in block.iter_vars]
    reduce = tuple(n for n, iv in enumerate(block.iter_vars) if iv.iter_type == tirx.IterVar.CommReduce)
    out = _positions(store.indices, names)
    if not reduce or out is None or len(out) < 3 or None in out:
        return None
    plain = [_positions(load.indices, names) for load in (product.a, product.b)]
    if (plain[0] is None) == (plain[1] is None):
        return None
    weight = plain[0] if plain[0] is not None else plain[1]
    channels = [p for p in weight if p is not None and p not in reduce]
    if len(channels) != 1 or channels[0] == out[-1] or channels[0] not in out:
        return None
    f, x = channels[0], out[-1]
    return ConvForm(tuple(p for p in out if p not in (f, x)), f, x, reduce, tuple(out))


def inline_elementwise_epilogue(sch: Schedule, main, shape=None):
    """The blocks after ``main`` that are elementwise on ``shape`` (default: its output's; a chain of bias, activation,
    residual add...), inlined into the last of them, which is returned with the blocks after the chain
    (ones fusion put there that are not elementwise on that shape, e.g. the next layer's zero padding:
    computed inside ``main``'s tiles they would leave every element no tile covers unwritten).
    Returns (last block of the chain or None where there is none, [blocks after it]), or None where a
    block of the chain cannot be inlined."""
    blocks = root_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    after = blocks[names.index(sch.get(main).name_hint) + 1:]
    shape = sch.get(main).writes[0].source.shape if shape is None else shape
    chain = []
    for block in after:
        if not _elementwise_on(sch.get(block), shape):
            break
        chain.append(block)
    for block in chain[:-1]:
        try:
            sch.compute_inline(block)
        except ScheduleError:
            return None
    return (chain[-1] if chain else None), after[len(chain):]


def _elementwise_on(block: tirx.SBlock, shape) -> bool:
    """Whether ``block`` writes one buffer of ``shape`` at exactly its (all spatial) iter vars, in order."""
    if len(block.writes) != 1 or len(block.iter_vars) != len(shape):
        return False
    if any(iv.iter_type != tirx.IterVar.DataPar for iv in block.iter_vars):
        return False
    analyzer = tvm.sym.Analyzer()
    written = block.writes[0]
    if len(written.source.shape) != len(shape) or not all(
            analyzer.can_prove_equal(a, b) for a, b in zip(written.source.shape, shape)):
        return False
    return all(r.min.same_as(iv.var) and analyzer.can_prove_equal(r.extent, 1)
               for r, iv in zip(written.region, block.iter_vars))
