"""Hand schedules against MetaSchedule-tuned ones (issue: tune), B = 256, d = 4096, fp32.

For BTT rank 1, SPM and SparseMaxPlus k=2: the hand schedule's time, the best after 64 and after all
trials (default 256; read from the records in the order they were measured, so one run gives both),
the time spent tuning, and the compiled model with the database against the one without, timed in
interleaved rounds (the compiler must keep the hand schedule where tuning found nothing better).

With ``--tvm-ops``, instead: a model of TVM's own ops (``nn.Linear(d, d)``, GELU, LayerNorm), each kernel
searched over MetaSchedule's standard CPU design space: per kernel the hand schedule against the best record,
and the compiled model with the database against the one without.

    python benchmarks/bench_tune.py [--trials 256] [--d 4096] [--database-root out/bench_tune] [--tvm-ops]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn

import structfx as sfx
from structfx.measure import interleaved_medians
from structfx.nn import BTTLinear, SparseMaxPlus, SPMLinear

BATCH = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--database-root", type=Path, default=Path("out/bench_tune"))
    parser.add_argument("--tvm-ops", action="store_true", help="a model of TVM's own ops instead of ours")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.tvm_ops:
        tvm_ops(args.d, args.trials, args.database_root / "tvm_ops")
        return
    d = args.d
    ops = {
        "BTT r=1": BTTLinear(d, d, 1),
        "SPM orthogonal": SPMLinear(d, d),
        "SparseMaxPlus k=2": SparseMaxPlus(d, d, 2),
    }
    checkpoint = min(64, args.trials)
    print(f"d = {d}, B = {BATCH}, fp32, 2 threads; kernel times as MetaSchedule measured them\n")
    print(f"| op | hand ms | tuned @{checkpoint} ms | tuned @{args.trials} ms | tuning s | compiled: tuned vs hand |")
    print("|---|---|---|---|---|---|")
    for name, layer in ops.items():
        model = nn.Sequential(layer).eval()
        x = torch.randn(BATCH, d)
        database = args.database_root / name.replace(" ", "_").replace("=", "")
        shutil.rmtree(database, ignore_errors=True)
        start = time.perf_counter()
        sfx.tune(model, x, trials=args.trials, database=database)
        spent = time.perf_counter() - start
        records = [json.loads(line) for line in (database / "records.jsonl").read_text().splitlines()]
        records = [r for r in records if r["kernel"].startswith("structfx_")]  # the op's own kernel
        hand = next(r["seconds"] for r in records if r["hand"])
        early = min(r["seconds"] for r in records[:checkpoint])
        best = min(r["seconds"] for r in records)
        tuned, plain = sfx.compile(model, x, database=database), sfx.compile(model, x)
        with torch.no_grad():
            times = interleaved_medians({"tuned": lambda: tuned(x), "hand": lambda: plain(x)}, rounds=15)
        print(f"| {name} | {hand * 1e3:.3f} | {early * 1e3:.3f} ({hand / early:.2f}x) | "
              f"{best * 1e3:.3f} ({hand / best:.2f}x) | {spent:.0f} | {times['hand'] / times['tuned']:.2f}x |",
              flush=True)


def tvm_ops(d: int, trials: int, database: Path) -> None:
    model = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d)).eval()
    x = torch.randn(BATCH, d)
    shutil.rmtree(database, ignore_errors=True)
    start = time.perf_counter()
    sfx.tune(model, x, trials=trials, database=database)
    spent = time.perf_counter() - start
    records = [json.loads(line) for line in (database / "records.jsonl").read_text().splitlines()]
    print(f"nn.Linear({d}, {d}) + GELU + LayerNorm, B = {BATCH}, fp32, 2 threads, {trials} trials per kernel "
          f"({spent:.0f} s); kernel times as MetaSchedule measured them\n")
    print("| kernel | records | hand ms | tuned ms |")
    print("|---|---|---|---|")
    for kernel in sorted({r["kernel"] for r in records}):
        mine = [r for r in records if r["kernel"] == kernel]
        hand = next(r["seconds"] for r in mine if r["hand"])
        best = min(r["seconds"] for r in mine)
        if math.isinf(hand):  # slower than the runner's timeout (30 s for warm-up + 3 x 3 calls)
            print(f"| {kernel} | {len(mine)} | timed out (> 3 s per call) | {best * 1e3:.3f} |")
        else:
            print(f"| {kernel} | {len(mine)} | {hand * 1e3:.3f} | {best * 1e3:.3f} ({hand / best:.2f}x) |")
    tuned, plain = sfx.compile(model, x, database=database), sfx.compile(model, x)
    with torch.no_grad():
        times = interleaved_medians({"tuned": lambda: tuned(x), "hand": lambda: plain(x)}, rounds=15)
    print(f"\ncompiled model: {times['hand'] * 1e3:.2f} ms without the database, {times['tuned'] * 1e3:.2f} ms "
          f"with it ({times['hand'] / times['tuned']:.2f}x)")


if __name__ == "__main__":
    main()
