"""Eager PyTorch cost of each structured layer against nn.Linear of the same shape (issue: foundation).

B = 256, d in {1024, 4096}, 2 threads, fp32; medians of interleaved rounds after warm-up, so every ratio
compares numbers measured in the same run. Also the peak memory of SparseMaxPlus against the paper's
broadcast form ``(x[:, None, :] + W).amax(-1)``.

    python benchmarks/bench_layers.py [--sizes 1024 4096] [--rounds 9]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from structfx.measure import interleaved_medians, peak_allocated_bytes
from structfx.nn import BTTLinear, SparseMaxPlus, SPMLinear

BATCH = 256


def layers(d: int) -> dict[str, nn.Module]:
    return {
        "nn.Linear": nn.Linear(d, d),
        "BTT r=1": BTTLinear(d, d, rank=1),
        "BTT r=4": BTTLinear(d, d, rank=4),
        "SPM orthogonal": SPMLinear(d, d),
        "SPM general": SPMLinear(d, d, variant="general"),
        "SparseMaxPlus k=2": SparseMaxPlus(d, d, k=2),
    }


def time_layers(d: int, rounds: int) -> dict[str, tuple[float, float]]:
    """(forward, forward + backward) median seconds per layer."""
    x = torch.randn(BATCH, d)
    x_grad = x.clone().requires_grad_()
    modules = layers(d)

    def forward(m):
        return lambda: m(x)

    def forward_backward(m):
        return lambda: m(x_grad).sum().backward()

    with torch.no_grad():
        fwd = interleaved_medians({name: forward(m) for name, m in modules.items()}, rounds=rounds)
    both = interleaved_medians({name: forward_backward(m) for name, m in modules.items()}, rounds=rounds)
    return {name: (fwd[name], both[name]) for name in modules}


def memory_rows(d: int) -> tuple[int, int | None]:
    """Peak bytes of SparseMaxPlus forward + backward, and of the broadcast form where it fits (d <= 1024)."""
    layer = SparseMaxPlus(d, d, k=2)
    x = torch.randn(BATCH, d, requires_grad=True)
    ours = peak_allocated_bytes(lambda: layer(x).sum().backward())
    broadcast = peak_allocated_bytes(lambda: layer.reference(x).sum().backward()) if d <= 1024 else None
    return ours, broadcast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B = {BATCH}, fp32\n")
    print("| d | layer | fwd ms | fwd+bwd ms | fwd speed-up vs nn.Linear | fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|")
    for d in args.sizes:
        rows = time_layers(d, args.rounds)
        dense_fwd, dense_both = rows["nn.Linear"]
        for name, (fwd, both) in rows.items():
            ratios = f"{dense_fwd / fwd:.2f}x | {dense_both / both:.2f}x"
            print(f"| {d} | {name} | {fwd * 1e3:.3f} | {both * 1e3:.3f} | {ratios} |")
    print("\n| d | SparseMaxPlus k=2 fwd+bwd peak | broadcast form fwd+bwd peak |")
    print("|---|---|---|")
    for d in args.sizes:
        ours, broadcast = memory_rows(d)
        needed = f"not run: the (B, d, d) tensor alone is {BATCH * d * d * 4 / 2**30:.0f} GiB"
        theirs = f"{broadcast / 2**20:.0f} MiB" if broadcast else needed
        print(f"| {d} | {ours / 2**20:.1f} MiB | {theirs} |")


if __name__ == "__main__":
    main()
