"""Where a parallel loop starts to pay on this machine: the grain size of structfx.lowering.parallel_grain.

Each kernel (an elementwise ``x * 2 + 1`` over n elements, a matmul (m, k) x (k, n)) is scheduled by the
CPU rules and built twice: every parallel loop kept parallel, and every one run serially. The two are
timed in interleaved rounds (so a slow spell on this shared host hits both alike), each sample a block
of consecutive calls; the table gives the work (scalar block executions, the pass's measure) and the
parallel build's time over the serial one's: below 1 the parallel region pays. TVM's thread pool reads
``TVM_THREAD_POOL_SPIN_COUNT`` once: ``--spin-count 0`` measures workers that sleep after each task.

    python benchmarks/bench_parallel_grain.py [--spin-count N] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os

NEVER = 1 << 62


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spin-count", type=int, default=None, help="TVM_THREAD_POOL_SPIN_COUNT (default: TVM's)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if args.spin_count is not None:
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = str(args.spin_count)
    import numpy as np

    from structfx.lowering.compat import te, tvm
    from structfx.lowering.parallel_grain import apply_parallel_grain
    from structfx.lowering.schedules import apply_schedules
    from structfx.lowering.target import host_target
    from structfx.measure import interleaved_medians

    target = host_target()

    def builds(tensors, work):
        func = te.create_prim_func(tensors).with_attr("global_symbol", "kernel")
        scheduled = apply_schedules(tvm.IRModule({"kernel": func}), target)
        arrays = [tvm.runtime.tensor(np.random.rand(*[int(d) for d in t.shape]).astype("float32")) for t in tensors]
        calls = max(1, min(200, int(4e6 // work)))
        fns = {}
        for name, grain in (("parallel", 0), ("serial", NEVER)):
            kernel = tvm.compile(apply_parallel_grain(scheduled, target, grain), target=target)["kernel"]

            def block(kernel=kernel):
                for _ in range(calls):
                    kernel(*arrays)

            fns[name] = block
        times = interleaved_medians(fns, warmup=2, rounds=args.rounds)
        return {name: seconds / calls for name, seconds in times.items()}

    print(f"threads: {os.cpu_count()}, TVM_THREAD_POOL_SPIN_COUNT={os.environ.get('TVM_THREAD_POOL_SPIN_COUNT')}")
    print(f"{'kernel':<28}{'work':>12}{'parallel us':>14}{'serial us':>12}{'par/ser':>9}")
    cases = []
    for n in (1024, 4096, 16384, 65536, 262144, 1 << 20, 1 << 22):
        x = te.placeholder((n // 64, 64), name="x")
        y = te.compute(x.shape, lambda i, j: x[i, j] * 2.0 + 1.0, name="y")
        cases.append((f"elementwise n={n}", [x, y], n))
    for m, k, n in ((1, 128, 128), (4, 128, 128), (32, 64, 32), (32, 128, 128), (32, 128, 512), (64, 256, 256),
                    (1, 1024, 1024), (16, 1024, 1024), (64, 1024, 1024), (1, 4096, 4096), (16, 4096, 4096)):
        a = te.placeholder((m, k), name="a")
        b = te.placeholder((k, n), name="b")
        r = te.reduce_axis((0, k), name="r")
        c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r), name="c")
        cases.append((f"matmul {m}x{k}x{n}", [a, b, c], m * k * n))
    for label, tensors, work in cases:
        times = builds(tensors, work)
        par, ser = times["parallel"] * 1e6, times["serial"] * 1e6
        print(f"{label:<28}{work:>12}{par:>14.2f}{ser:>12.2f}{par / ser:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
