"""ChannelMaxPlus read in place against the path it replaced, on the zoo's conv models (issue 12).

For each model and batch: the original eager and compiled, and transformed with [BTT(rank=4), MaxPlus(k=2)]
and compiled twice: with ChannelMaxPlus as it is (``sparse_maxplus(x, ..., dim=1)``: one kernel) and with
the former path (``x.movedim(1, -1)`` -> the last-dim op -> ``movedim(-1, 1)`` -> a contiguous copy:
two transposes around the kernel). Each variant is timed in its own block after warm-up, the blocks
taken in turn for several rounds; the median of the rounds is printed, with the VM calls of one run.

    PYTHONPATH=$PWD python benchmarks/bench_channel_maxplus.py [--rounds 5] [--models RegNet,ResNet] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402

import structfx as sfx  # noqa: E402
from structfx.lowering.compat import relax, tvm  # noqa: E402
from structfx.nn import ChannelMaxPlus  # noqa: E402
from structfx.nn.maxplus import in_layout_of  # noqa: E402

MODELS = ("RegNet", "ResNet", "ConvNeXt", "MobileNetV2")


class TransposedChannelMaxPlus(ChannelMaxPlus):
    """ChannelMaxPlus as it was computed before: the last-dim op between two transposes."""

    def forward(self, x):
        rows = x.movedim(1, -1)
        y = in_layout_of(rows, torch.ops.structfx.sparse_maxplus(rows, self.idx, self.weight, self.bias))
        return in_layout_of(x, y.movedim(-1, 1))


def transposed(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module) is ChannelMaxPlus:
            module.__class__ = TransposedChannelMaxPlus
    return model


def vm_calls(compiled, inputs) -> int:
    """Kernels and VM builtins one call runs."""
    vm = relax.VirtualMachine(compiled.executable, compiled.device)
    params = [tvm.runtime.tensor(p.numpy(), compiled.device) for p in compiled.params]
    args = [compiled._to_device(a) for a in inputs]
    calls = [0]

    def count(func, symbol, before, ret, *rest):
        calls[0] += int(bool(before))
        return 0

    vm["main"](*args, *params)
    vm.set_instrument(count)
    vm["main"](*args, *params)
    return calls[0]


def block_ms(run, calls: int) -> float:
    for _ in range(3):
        run()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    print("model batch | ms (median of rounds): eager, compiled original, transformed transposed, transformed "
          "in place | VM calls: original, transposed, in place | in place vs original, vs transposed")
    for name in args.models.split(","):
        entry = next(e for e in zoo.ZOO if e.name == name)
        for batch in map(int, args.batches.split(",")):
            model = zoo.build(entry)
            x = entry.inputs(batch)
            small = sfx.transform(model, [sfx.BTT(rank=4), sfx.MaxPlus(k=2)], example_inputs=x)
            channel = sum(type(m) is ChannelMaxPlus for m in small.modules())
            compiled = {"original": sfx.compile(model, x), "transposed": sfx.compile(transposed(small), x),
                        "in place": sfx.compile(small, x)}
            with torch.no_grad():
                eager = block_ms(lambda: model(*x), args.calls)
            times = {key: [] for key in compiled}
            for _ in range(args.rounds):
                for key, cm in compiled.items():
                    times[key].append(block_ms(lambda cm=cm: cm(*x), args.calls))
            ms = {key: statistics.median(values) for key, values in times.items()}
            calls = {key: vm_calls(cm, x) for key, cm in compiled.items()}
            print(f"{name} b{batch} ({channel} ChannelMaxPlus) | {eager:.3f}, {ms['original']:.3f}, "
                  f"{ms['transposed']:.3f}, {ms['in place']:.3f} | {calls['original']}, {calls['transposed']}, "
                  f"{calls['in place']} | {ms['original'] / ms['in place']:.2f}x, "
                  f"{ms['transposed'] / ms['in place']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
