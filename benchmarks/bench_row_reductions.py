"""The row-reduction kernels of zoo models (softmax, layer norm, RMS norm, masks) before and after the RowReduction
schedule rule (structfx/lowering/schedule_rules/reduction.py), next to torch's own op on the same shape.

Each kernel is taken from the model's legalized module and built twice in this process: by the CPU rules as they
are (after) and by the same rules without RowReduction (before: dlight's CPU Reduction rule or GenericCPU). Both
run on the arguments the compiled model passes the kernel (captured with the VM's instrument), timed with TVM's
time_evaluator (best of 5 repeats of 100 calls); torch's twin (F.layer_norm, softmax over the last axis, T5's RMS
norm) is timed first, in its own block, after TVM's thread pool has gone quiet. ``--threads 1`` runs TVM and
torch on one thread each: on a loaded shared host a parallel region waits for its slowest worker, which swamps
kernels of tens of microseconds.

    python benchmarks/bench_row_reductions.py "GPT-2" 8 [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

KERNEL_WORDS = ("norm", "softmax", "mean", "sum", "max")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a zoo entry name (benchmarks/zoo.py)")
    parser.add_argument("batch", type=int)
    parser.add_argument("--threads", type=int, default=None, help="TVM_NUM_THREADS and torch's threads")
    args = parser.parse_args()
    if args.threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    import structfx
    import structfx.lowering.build as build
    from structfx.lowering.compat import dlight, relax, tirx, tvm
    from structfx.lowering.parallel_grain import BUILD_CONFIG, apply_parallel_grain
    from structfx.lowering.schedule_rules.reduction import RowReduction
    from structfx.lowering.schedules import schedule_rules_for

    sys.path.insert(0, os.path.dirname(__file__))
    import zoo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    entry = next(e for e in zoo.ZOO if e.name == args.model)
    legalized, schedule_module = {}, build.schedule_module

    def capture(mod, target, database=None):
        # copies: scheduling updates the module's functions in place
        legalized.update({gv.name_hint: tvm.script.from_source(f.script()) for gv, f in mod.functions_items()
                          if isinstance(f, tirx.PrimFunc) and any(w in gv.name_hint for w in KERNEL_WORDS)})
        legalized["target"] = target
        return schedule_module(mod, target, database)

    build.schedule_module = capture
    inputs = entry.inputs(args.batch)
    compiled = structfx.compile(zoo.build(entry), inputs)
    target = legalized.pop("target")
    kernels = {name: f for name, f in legalized.items() if RowReduction().apply(f, target, False) is not None}

    arguments: dict = {}

    def instrument(func, name, before, ret, *tensors):
        if before and name in kernels and name not in arguments:
            arguments[name] = [t.numpy() for t in tensors]
        return 0

    vm = relax.VirtualMachine(compiled.executable, compiled.device)
    vm.set_instrument(instrument)
    vm["main"](*[compiled._to_device(x) for x in inputs],
               *[tvm.runtime.tensor(p.numpy(), compiled.device) for p in compiled.params])

    def built(func, with_rule: bool):
        rules = [r for r in schedule_rules_for(target) if with_rule or not isinstance(r, RowReduction)]
        with target:
            mod = dlight.ApplyDefaultSchedule(*rules)(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
        with tvm.transform.PassContext(config=BUILD_CONFIG):
            return tvm.compile(apply_parallel_grain(mod, target), target=target)

    def tvm_us(lib, arrays):
        tensors = [tvm.runtime.tensor(a) for a in arrays]
        timer = lib.mod.time_evaluator("main", tvm.cpu(), number=100, repeat=5)
        timer(*tensors)
        return min(timer(*tensors).results) * 1e6, tensors[-1].numpy()

    def torch_twin(name, arrays):
        t = [torch.from_numpy(a) for a in arrays]
        if name.startswith("layer_norm"):
            return lambda: torch.nn.functional.layer_norm(t[0], t[0].shape[-1:], t[1], t[2])
        if "softmax" in name:
            return lambda: torch.softmax(t[0], -1)
        if "mean" in name and "rsqrt" in name:  # T5's RMS norm on the squares the kernel reads
            return lambda: t[2] * (t[1] * torch.rsqrt(t[0].mean(-1, keepdim=True) + 1e-6))
        return None

    time.sleep(2)
    torch_us = {}
    with torch.no_grad():
        for name, arrays in arguments.items():
            twin = torch_twin(name, arrays[:-1])
            if twin is None:
                continue
            for _ in range(20):
                twin()
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(100):
                    twin()
                best = min(best, (time.perf_counter() - start) / 100 * 1e6)
            torch_us[name] = best
    print(f"{args.model} batch {args.batch}, threads {args.threads or 'all'}: microseconds per call")
    print(f"{'kernel':58s} {'first input':18s} {'before':>8s} {'after':>8s} {'speed-up':>8s} {'torch':>8s}  max|diff|")
    for name, arrays in arguments.items():
        after, got = tvm_us(built(kernels[name], True), arrays)
        before, want = tvm_us(built(kernels[name], False), arrays)
        diff = float(np.nanmax(np.abs(got.astype("float64") - want))) if got.dtype.kind == "f" else 0.0
        print(f"{name:58s} {str(arrays[0].shape):18s} {before:8.1f} {after:8.1f} {before / after:7.1f}x "
              f"{torch_us.get(name, float('nan')):8.1f}  {diff:.1e}")


if __name__ == "__main__":
    main()
