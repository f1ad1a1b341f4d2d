"""Compiled structfx ops on a GPU against dense nn.Linear (cuBLAS) and torch.compile (issue: CUDA).

B = 256, d in {1024, 4096}, fp32; achieved GB/s against the GPU's copy bandwidth measured by the same
script. On a machine without a CUDA GPU (or without a CUDA build of torch) it says so and exits 0.

    python benchmarks/bench_cuda.py [--sizes 1024 4096] [--rounds 20]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import structfx as sfx
from structfx.lowering.compat import tvm
from structfx.nn import BTTLinear, SparseMaxPlus, SPMLinear

BATCH = 256


def gpu_missing() -> str | None:
    if not tvm.cuda(0).exist:
        return "no CUDA GPU on this machine: nothing to measure (the cuda build itself is tested in tests/lowering)"
    if not torch.cuda.is_available():
        return "a GPU is present but this torch is a CPU build: install a CUDA torch for the baselines"
    return None


def cuda_ms(fn, rounds: int) -> float:
    """Median of CUDA-event timings after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    reason = gpu_missing()
    if reason:
        print(reason)
        sys.exit(0)
    src = torch.empty(64 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / cuda_ms(lambda: dst.copy_(src), args.rounds) / 1e6
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s; B = {BATCH}, fp32\n")
    print("| d | op | structfx ms | vs cuBLAS nn.Linear | vs torch.compile | GB/s (% copy) |")
    print("|---|---|---|---|---|---|")
    for d in args.sizes:
        x = torch.randn(BATCH, d, device="cuda")
        dense = nn.Linear(d, d).cuda()
        for name, module in {"BTT r=1": BTTLinear(d, d, 1), "BTT r=4": BTTLinear(d, d, 4),
                             "SPM orthogonal": SPMLinear(d, d), "SparseMaxPlus k=2": SparseMaxPlus(d, d, 2)}.items():
            compiled = sfx.compile(module.eval(), x.cpu(), target="cuda")  # this GPU's arch
            inductor = torch.compile(module.cuda())
            with torch.no_grad():
                dense_ms = cuda_ms(lambda: dense(x), args.rounds)
                inductor_ms = cuda_ms(lambda: inductor(x), args.rounds)
            ours = cuda_ms(lambda: compiled(x), args.rounds)
            gbs = 2 * BATCH * d * 4 / ours / 1e6
            print(f"| {d} | {name} | {ours:.3f} | {dense_ms / ours:.1f}x | {inductor_ms / ours:.2f}x | "
                  f"{gbs:.0f} ({100 * gbs / copy_gbs:.0f}%) |")


if __name__ == "__main__":
    main()
