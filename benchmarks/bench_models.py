"""Compiled models against eager PyTorch and torch.compile (issue 12): nn.Linear, a zoo of transformers
architectures, and a BERT-base-sized encoder layer.

One run, fp32, this host's threads (2). Every variant is timed in blocks of its own (``block_medians``:
warm-up calls, then the median of consecutive calls), never interleaved call by call with another:
TVM's and torch's thread pools spin after a call and slow each other when calls alternate. The blocks
come in rounds (eager's block, then each compiled variant's, three times over) and each variant keeps
its best block, so one slow spell of this shared host does not land on one variant alone. TVM's workers are
also told not to spin (``TVM_THREAD_POOL_SPIN_COUNT=0``, set before TVM loads). Only ratios measured in
the same run mean anything on this shared host. Every compiled output is checked against eager
(relative error of the first output under 1e-4) before it is timed.

    python benchmarks/bench_models.py [--sections linear zoo layer] [--repeat 7] [--models BERT ViT]
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from zoo import ZOO, build  # noqa: E402

import structfx as sfx  # noqa: E402
from structfx.measure import block_medians, median_seconds  # noqa: E402

TOLERANCE = 1e-4
STRUCTURED = [sfx.BTT(rank=4), sfx.MaxPlus(k=2)]


def first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return first_tensor(output[0])


def relative_error(got, want) -> float:
    got, want = first_tensor(got), first_tensor(want)
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def timed(fns: dict, args: tuple, repeat: int) -> dict[str, float]:
    """Seconds per call of each ``fns[name](*args)``, in blocks of its own (``block_medians``)."""
    with torch.no_grad():
        return block_medians({name: (lambda fn=fn: fn(*args)) for name, fn in fns.items()}, repeat=repeat)


def checked(name: str, compiled, reference, args: tuple) -> float:
    with torch.no_grad():
        error = relative_error(compiled(*args), reference(*args))
    if not error < TOLERANCE:
        print(f"  !! {name}: relative error {error:.1e} against eager exceeds {TOLERANCE}")
    return error


def linear_section(repeat: int) -> list[str]:
    """nn.Linear(d, d) at batch 256, 16 and 1: compiled against eager, and against torch.matmul's rate."""
    rows = ["| d | batch | eager ms | compiled ms | compiled / eager speed | compiled GFLOP/s | "
            "torch.matmul GFLOP/s | share of torch.matmul |", "|---|---|---|---|---|---|---|---|"]
    for d in (1024, 4096):
        torch.manual_seed(0)
        layer = nn.Linear(d, d).eval()
        compiled = sfx.compile(layer, torch.randn(256, d))
        a, w = torch.randn(256, d), torch.randn(d, d)
        matmul_rate = 2 * 256 * d * d / median_seconds(lambda: torch.matmul(a, w.T), 2, repeat) / 1e9
        for batch in (256, 16, 1):
            x = torch.randn(batch, d)
            checked(f"Linear({d}) batch {batch}", compiled, layer, (x,))
            times = timed({"eager": layer, "ours": compiled}, (x,), repeat)
            eager, ours = times["eager"], times["ours"]
            rate = 2 * batch * d * d / ours / 1e9
            row = (f"| {d} | {batch} | {eager * 1e3:.3f} | {ours * 1e3:.3f} | {eager / ours:.2f}x | {rate:.1f} | "
                   f"{matmul_rate:.1f} | {rate / matmul_rate:.0%} |")
            print(row, flush=True)
            rows.append(row)
    return rows


def zoo_section(repeat: int, only: list[str] | None) -> list[str]:
    """Each architecture at batch 1 and 8: eager, torch.compile, structfx.compile of the original, and
    the [BTT(rank=4), MaxPlus(k=2)] transform compiled; speeds relative to eager."""
    rows = ["| model | batch | eager ms | torch.compile | compiled original | compiled BTT+MaxPlus | "
            "max error |", "|---|---|---|---|---|---|---|"]
    ours_ratios, transformed_ratios = [], []
    for entry in ZOO:
        if only and entry.name not in only:
            continue
        model = build(entry)
        example = entry.inputs(8)
        try:
            compiled = sfx.compile(model, example)
            small = sfx.transform(model, STRUCTURED, example_inputs=example)
            compiled_small = sfx.compile(small, example)
        except Exception as e:  # a model that does not compile is a row of the table, not the end of the run
            row = f"| {entry.name} | - | compile failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} |||||"
            print(row, flush=True)
            rows.append(row)
            continue
        for batch in (1, 8):
            args = entry.inputs(batch)
            errors = [checked(entry.name, compiled, model, args), checked(f"{entry.name} BTT", compiled_small,
                                                                          small, args)]
            torch._dynamo.reset()
            inductor = torch.compile(model)
            with torch.no_grad():
                inductor(*args)
            times = timed({"eager": model, "inductor": inductor, "ours": compiled, "ours_small": compiled_small},
                          args, repeat)
            eager, inductor_time, ours, ours_small = (times[k] for k in ("eager", "inductor", "ours", "ours_small"))
            ours_ratios.append(eager / ours)
            transformed_ratios.append(eager / ours_small)
            row = (f"| {entry.name} | {batch} | {eager * 1e3:.2f} | {eager / inductor_time:.2f}x | "
                   f"{eager / ours:.2f}x | {eager / ours_small:.2f}x | {max(errors):.1e} |")
            print(row, flush=True)
            rows.append(row)
    if ours_ratios:
        rows.append(f"| geometric mean | | | | {_geomean(ours_ratios):.2f}x | {_geomean(transformed_ratios):.2f}x | |")
        rows.append(f"| lowest | | | | {min(ours_ratios):.2f}x | {min(transformed_ratios):.2f}x | |")
        print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows


def layer_section(repeat: int) -> list[str]:
    """A BERT-base-sized encoder layer (hidden 768, FFN 3072, 12 heads) at batch 8, sequence 128."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, attn_implementation="eager")
    layer = BertLayer(config).eval()
    x = torch.randn(8, 128, 768)
    compiled = sfx.compile(layer, x)
    small = sfx.transform(layer, [sfx.BTT(rank=4)], example_inputs=(x,))
    compiled_small = sfx.compile(small, x)
    checked("BERT layer", compiled, layer, (x,))
    checked("BERT layer BTT", compiled_small, small, (x,))
    times = timed({"eager": layer, "eager_small": small, "ours": compiled, "ours_small": compiled_small}, (x,), repeat)
    eager, eager_small, ours, ours_small = (times[k] for k in ("eager", "eager_small", "ours", "ours_small"))
    rows = ["| variant | ms | speed vs eager original |", "|---|---|---|",
            f"| eager original | {eager * 1e3:.1f} | 1.00x |",
            f"| compiled original | {ours * 1e3:.1f} | {eager / ours:.2f}x |",
            f"| eager BTT(rank=4) | {eager_small * 1e3:.1f} | {eager / eager_small:.2f}x |",
            f"| compiled BTT(rank=4) | {ours_small * 1e3:.1f} | {eager / ours_small:.2f}x |"]
    print("\n".join(rows), flush=True)
    return rows


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["linear", "layer", "zoo"],
                        choices=["linear", "layer", "zoo"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--models", nargs="+", help="zoo entries to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.time()
    for section in args.sections:
        print(f"\n## {section}\n", flush=True)
        if section == "linear":
            linear_section(args.repeat)
        elif section == "layer":
            layer_section(args.repeat)
        else:
            zoo_section(args.repeat, args.models)
    print(f"\n(run took {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
