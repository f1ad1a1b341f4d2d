"""structfx.lowering.parallel_grain: parallel loops with little work run serially, decided at compile time where the
work is static and by a run-time guard where it is symbolic; both branches compute the same thing."""

import numpy as np
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.compat import Target, te, tirx, tvm
from structfx.lowering.parallel_grain import BUILD_CONFIG, GRAIN, apply_parallel_grain
from structfx.lowering.schedules import apply_schedules
from structfx.lowering.target import host_target

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"]})


def scale_shift(rows, cols=64):
    """y = 2x + 1 over a (rows, cols) input: GenericCPU gives it one parallel loop over the rows."""
    x = te.placeholder((rows, cols), name="x")
    y = te.compute((rows, cols), lambda i, j: x[i, j] * 2.0 + 1.0, name="y")
    return tvm.IRModule({"kernel": te.create_prim_func([x, y]).with_attr("global_symbol", "kernel")})


def matmul(m, k, n):
    a, b = te.placeholder((m, k), name="a"), te.placeholder((k, n), name="b")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r), name="c")
    return tvm.IRModule({"kernel": te.create_prim_func([a, b, c]).with_attr("global_symbol", "kernel")})


def loops(func):
    """Every For of ``func`` in pre-order, with the IfThenElse nodes met on the way, as (node, kind)."""
    found = []

    def visit(stmt):
        if isinstance(stmt, tirx.For):
            found.append((stmt, stmt.kind))
        elif isinstance(stmt, tirx.IfThenElse):
            found.append((stmt, "if"))
        for child in ("block", "body", "then_case", "else_case"):
            node = getattr(stmt, child, None)
            if isinstance(node, tirx.Stmt) or (node is not None and hasattr(node, "body")):
                visit(node)
        for part in getattr(stmt, "seq", []):
            visit(part)

    visit(func.body)
    return found


def kinds(mod):
    return [kind for _, kind in loops(mod["kernel"])]


def test_symbolic_work_gets_a_guard_choosing_the_parallel_loop_or_its_serial_twin():
    rows = tirx.Var("rows", "int64")
    mod = apply_parallel_grain(apply_schedules(scale_shift(rows), AVX2), AVX2)
    guard = next(node for node, kind in loops(mod["kernel"]) if kind == "if")
    assert str(guard.condition) == f"rows * T.int64(64) >= T.int64({GRAIN})"
    parallel, serial = guard.then_case, guard.else_case
    assert parallel.kind == tirx.ForKind.PARALLEL and serial.kind == tirx.ForKind.SERIAL
    assert str(parallel.extent) == str(serial.extent) and str(parallel.body) == str(serial.body)
    assert not parallel.loop_var.same_as(serial.loop_var)  # the twin's definitions are its own (ConvertSSA)


def test_static_loops_below_the_grain_become_serial_and_those_above_stay_parallel():
    small = apply_parallel_grain(apply_schedules(scale_shift(GRAIN // 64 - 1), AVX2), AVX2)
    large = apply_parallel_grain(apply_schedules(scale_shift(GRAIN // 64), AVX2), AVX2)
    assert tirx.ForKind.PARALLEL not in kinds(small) and "if" not in kinds(small)
    assert tirx.ForKind.PARALLEL in kinds(large) and "if" not in kinds(large)


def test_work_counts_every_block_execution_of_a_matmul():
    """The Matmul rule runs 16 x 64 x 16 as 4 parallel tiles of 4 rows by 16 columns; each tile is 64
    initialisations, 64 x 64 multiply-adds and 64 stores: 16896 block executions, serial at the default grain."""
    mod = apply_schedules(matmul(16, 64, 16), AVX2)
    assert kinds(mod).count(tirx.ForKind.PARALLEL) == 1
    assert tirx.ForKind.PARALLEL not in kinds(apply_parallel_grain(mod, AVX2))
    assert kinds(apply_parallel_grain(mod, AVX2, grain=16896)).count(tirx.ForKind.PARALLEL) == 1
    assert tirx.ForKind.PARALLEL not in kinds(apply_parallel_grain(mod, AVX2, grain=16897))


def test_a_symbolic_loop_owning_scratch_buffers_stays_parallel():
    """A matmul's accumulators, allocated in the root block and accessed only by its main loop: behind a guard TVM
    allocated them whole outside the parallel loop (nn.Linear(4096) at batch 1 ran 1.5x slower), so that loop keeps
    no guard; A's padding loop, which shares a_pad with the main loop, gets one."""
    rows = tirx.Var("rows", "int64")
    scheduled = apply_schedules(matmul(rows, 64, 16), AVX2)
    assert kinds(scheduled).count(tirx.ForKind.PARALLEL) == 2
    guarded = kinds(apply_parallel_grain(scheduled, AVX2))
    assert guarded.count("if") == 1 and guarded.count(tirx.ForKind.PARALLEL) == 2
    assert kinds(apply_parallel_grain(scheduled, AVX2, grain=1 << 40)).count(tirx.ForKind.PARALLEL) == 2


def test_other_targets_are_left_alone():
    mod = apply_schedules(scale_shift(4), AVX2)
    assert apply_parallel_grain(mod, Target({"kind": "cuda", "arch": "sm_90"})).same_as(mod)


def test_serial_and_parallel_branches_compute_the_same():
    rows = tirx.Var("rows", "int64")
    target = host_target()
    scheduled = apply_schedules(scale_shift(rows), target)
    guarded = tvm.compile(apply_parallel_grain(scheduled, target, grain=64 * 8), target=target)["kernel"]
    parallel = tvm.compile(apply_parallel_grain(scheduled, target, grain=0), target=target)["kernel"]
    for n in (1, 7, 8, 9, 131):  # below, at and above the grain of 8 rows
        x = np.random.default_rng(n).standard_normal((n, 64)).astype("float32")
        outs = [tvm.runtime.tensor(np.zeros_like(x)) for _ in range(2)]
        guarded(tvm.runtime.tensor(x), outs[0])
        parallel(tvm.runtime.tensor(x), outs[1])
        np.testing.assert_array_equal(outs[0].numpy(), x * 2 + 1)
        np.testing.assert_array_equal(outs[1].numpy(), outs[0].numpy())


def test_a_vector_predicate_in_both_branches_builds_with_the_build_config():
    """TVM's legalized slice_scatter selects on ``0 < int64(int64(j) < 4)``; vectorised and guarded, TIR's CSE bound
    the bool vector once for both branches and failed ("IntImm can only take scalar, but boolx16 was supplied")."""
    rows, int64 = tirx.Var("rows", "int64"), (lambda v: tirx.const(v, "int64"))
    a, b = te.placeholder((rows, 16), name="a"), te.placeholder((rows, 4), name="b")
    y = te.compute((rows, 16), lambda i, j: tirx.Select(
        int64(0) < tirx.Cast("int64", tirx.And(tirx.const(True, "bool"), tirx.Cast("int64", j) < int64(4))),
        b[i, tirx.max(tirx.min(tirx.Cast("int64", j), int64(3)), int64(0))], a[i, j]), name="y")
    target = host_target()
    mod = tvm.IRModule({"kernel": te.create_prim_func([a, b, y]).with_attr("global_symbol", "kernel")})
    guarded = apply_parallel_grain(apply_schedules(mod, target), target, grain=64)
    with tvm.transform.PassContext(config=BUILD_CONFIG):
        kernel = tvm.compile(guarded, target=target)["kernel"]
    for n in (1, 5):  # 16 and 80 elements: serial, parallel
        x, z = np.random.default_rng(n).standard_normal((2, n, 16)).astype("float32")
        out = tvm.runtime.tensor(np.zeros_like(x))
        kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(z[:, :4].copy()), out)
        np.testing.assert_array_equal(out.numpy(), np.concatenate([z[:, :4], x[:, 4:]], axis=1))


def test_compiled_model_matches_eager_on_both_sides_of_the_grain():
    """Linear(64, 64) at batch 1 is 4096 multiply-adds (serial), at batch 1100 it is 4505600 (parallel)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    compiled = sfx.compile(model, torch.randn(4, 64))
    for batch in (1, 3, 1100):
        x = torch.randn(batch, 64)
        with torch.no_grad():
            want = model(x)
        got = compiled(x)
        assert float((got - want).norm() / want.norm()) < 1e-5
