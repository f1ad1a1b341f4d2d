"""Compiled structfx ops against dense nn.Linear, their own eager form and torch.compile (issue: compile).

One run, fp32, 2 threads, B = 256, d in {1024, 4096}; medians of interleaved rounds. Also this machine's
peak matmul GFLOP/s and copy bandwidth, measured by the same script, to read the kernels against, and
the end-to-end model: 4 blocks Linear(2048, 8192) -> ReLU -> Linear(8192, 2048), transformed with
BTT rank 1 + MaxPlus and compiled, against the original under torch.compile. Then BTT at small batches
(1 and 16: the latency of one request), against its eager form and dense nn.Linear of the same size,
each variant timed in its own block.

    python benchmarks/bench_compile.py [--sizes 1024 4096] [--ops BTT] [--rounds 10] [--skip-end-to-end]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import structfx as sfx
from structfx.measure import interleaved_medians, median_seconds
from structfx.nn import BTTLinear, SparseMaxPlus, SPMLinear

BATCH = 256


def machine_peaks() -> tuple[float, float]:
    """(matmul GFLOP/s of torch.matmul at 2048^3, copy GB/s of a 256 MiB tensor), best of the run."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = 2 * 2048**3 / median_seconds(lambda: a @ b, warmup=2, repeat=7) / 1e9
    src = torch.empty(64 * 2**20)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), warmup=2, repeat=7) / 1e9
    return matmul, copy


def layers(d: int) -> dict[str, nn.Module]:
    return {
        "BTT r=1": BTTLinear(d, d, rank=1),
        "BTT r=4": BTTLinear(d, d, rank=4),
        "SPM orthogonal": SPMLinear(d, d),
        "SPM general": SPMLinear(d, d, variant="general"),
        "SparseMaxPlus k=2": SparseMaxPlus(d, d, k=2),
    }


def work(name: str, module: nn.Module, d: int) -> tuple[float, float]:
    """(flops, bytes moved at least) of one call at batch BATCH."""
    if isinstance(module, BTTLinear):
        m0, m1, n0, n1 = module.blocks
        macs = module.rank * (n0 * module.padded_in + m1 * module.padded_out)
        return 2 * BATCH * macs, 4 * (2 * BATCH * d)
    if isinstance(module, SPMLinear):
        return 2 * 2 * BATCH * module.width * module.stages, 4 * (2 * BATCH * d)
    return 2 * BATCH * module.k * d, 4 * (2 * BATCH * d)  # max-plus: add + max per entry


def bench_op(d: int, name: str, module: nn.Module, rounds: int, peak_gflops: float, copy_gbs: float) -> str:
    x = torch.randn(BATCH, d)
    dense = nn.Linear(d, d)
    module.eval()
    start = time.perf_counter()
    compiled = sfx.compile(module, x)
    build = time.perf_counter() - start
    inductor = torch.compile(module)
    with torch.no_grad():
        inductor(x)
        times = interleaved_medians(
            {"dense": lambda: dense(x), "eager": lambda: module(x), "torch.compile": lambda: inductor(x),
             "structfx": lambda: compiled(x)},
            rounds=rounds,
        )
    flops, moved = work(name, module, d)
    ours = times["structfx"]
    gflops, gbs = flops / ours / 1e9, moved / ours / 1e9
    return (
        f"| {d} | {name} | {ours * 1e3:.3f} | {times['dense'] / ours:.1f}x | {times['eager'] / ours:.1f}x | "
        f"{times['torch.compile'] / ours:.2f}x | {gflops:.1f} ({100 * gflops / peak_gflops:.0f}%) | "
        f"{gbs:.1f} ({100 * gbs / copy_gbs:.0f}%) | {build:.2f} |"
    )


def bench_small_batch(d: int, name: str, module: nn.Module, batch: int, rounds: int) -> str:
    """One row of the small-batch table: BTT compiled once (symbolic batch), timed at ``batch`` rows.
    Each variant is timed in its own block (median of ``2 * rounds`` consecutive calls after warm-up):
    at these sizes a call is shorter than the hand-over between TVM's and torch's thread pools, which
    interleaved rounds would measure instead."""
    dense = nn.Linear(d, d)
    module.eval()
    compiled = sfx.compile(module, torch.randn(BATCH, d))
    x = torch.randn(batch, d)
    with torch.no_grad():
        variants = {"dense": lambda: dense(x), "eager": lambda: module(x), "structfx": lambda: compiled(x)}
        times = {key: median_seconds(fn, warmup=5, repeat=2 * rounds) for key, fn in variants.items()}
    ours = times["structfx"]
    return (f"| {d} | {name} | {batch} | {ours * 1e3:.3f} | {times['eager'] * 1e3:.3f} | "
            f"{times['dense'] * 1e3:.3f} | {times['eager'] / ours:.2f}x | {times['dense'] / ours:.2f}x |")


def end_to_end(rounds: int) -> str:
    blocks = [nn.Sequential(nn.Linear(2048, 8192), nn.ReLU(), nn.Linear(8192, 2048)) for _ in range(4)]
    model = nn.Sequential(*blocks).eval()
    x = torch.randn(BATCH, 2048)
    small = sfx.transform(model, [sfx.BTT(rank=1), sfx.MaxPlus(k=2)], example_inputs=(x,)).eval()
    compiled = sfx.compile(small, x)
    inductor = torch.compile(model)
    with torch.no_grad():
        inductor(x)
        times = interleaved_medians({"original torch.compile": lambda: inductor(x), "structfx": lambda: compiled(x)},
                                    rounds=rounds)
    ratio = times["original torch.compile"] / times["structfx"]
    return (f"| 4 x (Linear 2048->8192, ReLU, Linear 8192->2048) | {times['original torch.compile'] * 1e3:.2f} | "
            f"{times['structfx'] * 1e3:.2f} | {ratio:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--ops", nargs="+", help="run only the ops whose name starts with one of these")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batches of the BTT latency table")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    peak, copy = machine_peaks()
    print(f"torch {torch.__version__}, 2 threads, B = {BATCH}, fp32; this run: matmul peak {peak:.0f} GFLOP/s, "
          f"copy {copy:.1f} GB/s\n")
    print("| d | op | structfx ms | vs dense nn.Linear | vs own eager | vs torch.compile | GFLOP/s (% peak) | "
          "GB/s (% copy) | build s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in args.sizes:
        for name, module in layers(d).items():
            if not args.ops or name.startswith(tuple(args.ops)):
                print(bench_op(d, name, module, args.rounds, peak, copy), flush=True)
    print("\n| d | op | batch | structfx ms | eager ms | dense nn.Linear ms | vs eager | vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.sizes:
        for name in ("BTT r=1", "BTT r=4"):
            for batch in args.batches:
                print(bench_small_batch(d, name, layers(d)[name], batch, args.rounds), flush=True)
    if not args.skip_end_to_end:
        print("\n| model | original, torch.compile ms | transformed + structfx.compile ms | speed-up |")
        print("|---|---|---|---|")
        print(end_to_end(args.rounds))


if __name__ == "__main__":
    main()
