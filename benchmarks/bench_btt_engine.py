"""BTT's own CPU kernel against BTT's two stages run by the GEMM engine that dense layers use (issue 12).

Issue 12 asks that BTT's two stages share dense layers' GEMM. This measures whether they should yet:
the kernel ``structfx.compile`` builds for BTT (``structfx/lowering/ops/btt.py``: both stages per tile
of rows, each on the dense layers' register-tile micro-kernel) against the same computation as two batched-matmul
PrimFuncs given to the CPU schedule rules (``structfx.lowering.schedules.schedule_rules_for``: the first rule that
takes a function schedules it, as at compile time): stage 1 ``(m1, B, m0) @ w1 (m1, m0, r n0)`` with the
input's transpose before it and the permuted store for stage 2 after it, stage 2 ``(n0, B, r m1) @ w2
(n0, r m1, n1)`` with bias and the output's transpose after it. Rows are symbolic in both builds (as
``structfx.compile`` leaves the batch), and both run at each batch. fp32, this host's threads; each
variant timed by TVM's time_evaluator in its own block, the best of three blocks.

    python benchmarks/bench_btt_engine.py [--shapes 1024,1024,1 1024,1024,4 ...] [--batches 1 16 256]
"""

from __future__ import annotations

import argparse

import numpy as np

from structfx.lowering.compat import te, tirx, tvm
from structfx.lowering.ops.btt import BTTCPU, ROWS, btt_te
from structfx.lowering.schedules import schedule_rules_for
from structfx.lowering.target import host_target
from structfx.nn.btt import btt_factors


def stage1_te(x, w1, n0: int):
    """x (B, m1, m0), w1 (m1, m0, r n0) -> z (n0, B, m1 r), stored permuted for stage 2."""
    rows, m1, m0 = x.shape
    n0 = tirx.IntImm("int64", n0)
    rank = w1.shape[2] // n0
    x1 = te.compute((m1, rows, m0), lambda i1, b, i0: x[b, i1, i0], name="stage1_in")
    k = te.reduce_axis((0, m0), "k")
    z = te.compute((m1, rows, w1.shape[2]), lambda i1, b, c: te.sum(x1[i1, b, k] * w1[i1, k, c], axis=k),
                   name="stage1_matmul")
    return te.compute((n0, rows, m1 * rank), lambda j0, b, q: z[q // rank, b, j0 * rank + q % rank],
                      name="stage1_out")


def stage2_te(z, w2, bias):
    """z (n0, B, r m1), w2 (n0, r m1, n1), bias (n0, n1) -> y (B, n0, n1)."""
    n0, rows, rm1 = z.shape
    k = te.reduce_axis((0, rm1), "k")
    y = te.compute((n0, rows, w2.shape[2]), lambda j0, b, j1: te.sum(z[j0, b, k] * w2[j0, k, j1], axis=k),
                   name="stage2_matmul")
    return te.compute((rows, n0, w2.shape[2]), lambda b, j0, j1: y[j0, b, j1] + bias[j0, j1], name="stage2_out")


def _int64(*extents):
    return [e if isinstance(e, tirx.Var) else tirx.IntImm("int64", e) for e in extents]


def _scheduled(func, target):
    """``func`` scheduled by the first CPU schedule rule that takes it, built."""
    for rule in schedule_rules_for(target):
        with target:
            sch = rule.apply(func, target, False)
        if sch is not None:
            return tvm.compile(sch.mod, target=target), type(rule).__name__
    raise RuntimeError("no rule scheduled the function")


def builds(d_in: int, d_out: int, rank: int, target):
    """{variant: [(built function, scheduling rule), ...]} and the block sizes (m1, m0, n0, n1)."""
    m1, m0, _ = btt_factors(d_in)
    n0, n1, _ = btt_factors(d_out)
    rows = tirx.Var("rows", "int64")
    x = te.placeholder(_int64(rows, m1, m0), name="x")
    w1 = te.placeholder(_int64(m1, m0, rank * n0), name="w1")
    w2 = te.placeholder(_int64(n0, rank * m1, n1), name="w2")
    bias = te.placeholder(_int64(n0, n1), name="bias")
    own = te.create_prim_func([x, w1, w2, bias, btt_te(x, w1, w2, bias, ROWS)])
    with target:
        own_lib = tvm.compile(BTTCPU().apply(own, target, False).mod, target=target)
    z_in = te.placeholder(_int64(n0, rows, rank * m1), name="z")
    stage1 = te.create_prim_func([x, w1, stage1_te(x, w1, n0)])
    stage2 = te.create_prim_func([z_in, w2, bias, stage2_te(z_in, w2, bias)])
    return {"own kernel": [(own_lib, "BTTCPU")],
            "engine": [_scheduled(stage1, target), _scheduled(stage2, target)]}, (m1, m0, n0, n1)


def run(d_in: int, d_out: int, rank: int, batches: list[int], target) -> list[str]:
    variants, (m1, m0, n0, n1) = builds(d_in, d_out, rank, target)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)

    def tensor(*shape):
        return tvm.runtime.tensor(rng.standard_normal(shape, dtype="float32"), dev)

    w1, w2, bias = tensor(m1, m0, rank * n0), tensor(n0, rank * m1, n1), tensor(n0, n1)
    rows = []
    for batch in batches:
        x, z = tensor(batch, m1, m0), tensor(n0, batch, rank * m1)
        y_own, y = tensor(batch, n0, n1), tensor(batch, n0, n1)
        calls = {"own kernel": [(x, w1, w2, bias, y_own)], "engine": [(x, w1, z), (z, w2, bias, y)]}
        best = {}
        for _ in range(3):
            for name, stages in variants.items():
                seconds = 0.0
                for (lib, _), args in zip(stages, calls[name]):
                    timer = lib.mod.time_evaluator("main", dev, number=10 if batch < 256 else 3, repeat=5)
                    seconds += float(np.median(timer(*args).results))
                best[name] = min(best.get(name, seconds), seconds)
        np.testing.assert_allclose(y.numpy(), y_own.numpy(), rtol=1e-3, atol=1e-3)
        rules = "+".join(rule for _, rule in variants["engine"])
        own, engine = best["own kernel"] * 1e3, best["engine"] * 1e3
        rows.append(f"| {d_in}->{d_out} | {rank} | {batch} | {own:.3f} | {engine:.3f} ({rules}) | "
                    f"{own / engine:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1024,1024,1", "1024,1024,4", "4096,4096,4", "768,3072,4"],
                        help="d_in,d_out,rank")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    args = parser.parse_args()
    target = host_target()
    print("| layer | rank | batch | own kernel ms | engine ms (rules) | engine speed vs own |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        d_in, d_out, rank = (int(v) for v in shape.split(","))
        run(d_in, d_out, rank, args.batches, target)


if __name__ == "__main__":
    main()
