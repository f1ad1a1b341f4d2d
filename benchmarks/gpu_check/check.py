"""The GPU half of the GPU check: run what prepare.py carried, with TVM's runtime alone, on this GPU.

Every check's artifact runs at each prepared batch and is compared with the float64 CPU reference
(relative Frobenius error under the plan's tolerance). Each timed kernel is then timed with the VM's
time_evaluator (device-resident inputs, median of repeats, each repeat at least 50 ms), against torch's
CUDA ``nn.Linear`` of the same shape (cuBLAS, CUDA events, median) in the same run; rates are printed
against this GPU's copy bandwidth (measured here) and its fp32 peak without tensor cores (given, from
the spec sheet). Writes log.txt, table.md and results.json under --out.

    python benchmarks/gpu_check/check.py --carry benchmarks/gpu_carry --out gpu_out [--device cpu]

With ``--device cpu`` (artifacts prepared with --target llvm) the same run checks this script here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

H200_FP32_TFLOPS = 67.0  # NVIDIA H200 SXM datasheet: FP32 67 TFLOPS (CUDA cores, no tensor cores)


class Log:
    def __init__(self, path: Path) -> None:
        self.file = open(path, "w")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    want = want.astype(np.float64)
    scale = max(float(np.linalg.norm(want)), 1e-30)
    return float(np.linalg.norm(got.astype(np.float64) - want)) / scale


def run_checks(plan: dict, carry: Path, device: str, log: Log) -> tuple[list[dict], dict]:
    from structfx.runtime import load

    results, runtimes = [], {}
    for check in plan["checks"]:
        runtime = runtimes[check["name"]] = load(carry / check["artifact"], device=device)
        for run in check["runs"]:
            inputs = [np.load(carry / p) for p in run["inputs"]]
            started = time.perf_counter()
            try:
                out = runtime(*inputs)
                outs = out if isinstance(out, tuple) else (out,)
                errors = [relative_error(o, np.load(carry / r)) for o, r in zip(outs, run["references"])]
                error = max(errors)
                status = "ok" if error < plan["tolerance"] else "MISMATCH"
            except Exception as e:  # one failing artifact must not hide the others' results
                error, status = float("nan"), f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            seconds = time.perf_counter() - started
            results.append({"name": check["name"], "batch": run["batch"], "error": error, "status": status})
            log(f"{status:8s} {check['name']:28s} batch {run['batch']:4d}  rel. error {error:.2e}  "
                f"({seconds * 1e3:.1f} ms with copies)")
    return results, runtimes


def device_ms(runtime, inputs: list[np.ndarray], device) -> float:
    """Median ms of one call of the artifact's main on device-resident inputs (VM time_evaluator)."""
    import tvm

    values = [tvm.runtime.tensor(a, device) for a in inputs]
    timer = runtime._vm.time_evaluator("main", device, number=10, repeat=7, min_repeat_ms=50)
    return 1e3 * float(np.median(timer(*values, *runtime._params).results))


def torch_dense_ms(d: int, batch: int, device: str) -> float:
    """cuBLAS: torch's nn.Linear(d, d) on (batch, d) fp32, median of CUDA-event timings after warm-up."""
    import torch

    if device == "cpu":
        layer, x = torch.nn.Linear(d, d), torch.randn(batch, d)
        with torch.no_grad():
            for _ in range(3):
                layer(x)
            times = []
            for _ in range(20):
                started = time.perf_counter()
                layer(x)
                times.append((time.perf_counter() - started) * 1e3)
        return float(np.median(times))
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on CUDA cores, as our kernels
    layer, x = torch.nn.Linear(d, d).cuda(), torch.randn(batch, d, device="cuda")
    times = []
    with torch.no_grad():
        for _ in range(5):
            layer(x)
        torch.cuda.synchronize()
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            layer(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return float(np.median(times))


def copy_gbs(device: str) -> float:
    """Device copy bandwidth (read + write), GB/s: the bandwidth ceiling measured in this run."""
    import torch

    if device == "cpu":
        src = torch.empty(16 * 2**20)
        dst = torch.empty_like(src)
        started = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        return 2 * src.numel() * 4 * 10 / (time.perf_counter() - started) / 1e9
    src = torch.empty(256 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() * 4 / float(np.median(times)) / 1e6


def time_kernels(plan: dict, carry: Path, runtimes: dict, device: str, log: Log) -> list[dict]:
    import tvm

    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    bandwidth = copy_gbs(device)
    log(f"\ncopy bandwidth measured: {bandwidth:.0f} GB/s; fp32 peak (spec): {H200_FP32_TFLOPS:.0f} TFLOP/s")
    rows = []
    for check in (c for c in plan["checks"] if c["kind"] == "timed"):
        x = np.random.default_rng(0).standard_normal((check["batch"], check["d"]), dtype=np.float32)
        ours = device_ms(runtimes[check["name"]], [x], dev)
        dense = torch_dense_ms(check["d"], check["batch"], device)
        gbs = check["bytes"] / ours / 1e6
        tflops = check["flops"] / ours / 1e9
        rows.append({**{k: check[k] for k in ("op", "d", "batch", "bytes", "flops")}, "ms": ours,
                     "dense_ms": dense, "speedup_vs_dense": dense / ours, "gbs": gbs,
                     "bandwidth_share": gbs / bandwidth, "tflops": tflops, "peak_share": tflops / H200_FP32_TFLOPS})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| op | d | B | ms | cuBLAS dense ms | x dense | GB/s (% copy) | GFLOP/s (% fp32 peak) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['d']} | {r['batch']} | {r['ms']:.4f} | {r['dense_ms']:.4f} | "
                     f"{r['speedup_vs_dense']:.1f}x | {r['gbs']:.0f} ({100 * r['bandwidth_share']:.0f}%) | "
                     f"{r['tflops'] * 1e3:.0f} ({100 * r['peak_share']:.1f}%) |")
    return "\n".join(lines) + "\n"


def cuda_runtime_loads(tvm, log: Log) -> None:
    """TVM skips its CUDA runtime silently when it cannot load (a missing libcuda or libcudart): say why."""
    import ctypes

    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    path = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(path))
        log(f"{path.name} loads with ctypes but TVM did not load it")
    except OSError as e:
        log(f"TVM's CUDA runtime cannot load: {e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carry", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--no-timing", action="store_true", help="numerics only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "log.txt")
    plan = json.loads((args.carry / "plan.json").read_text())
    import tvm

    log(f"python {sys.version.split()[0]}, tvm {tvm.__version__} from {tvm.__file__}, "
        f"runtime only: {not hasattr(tvm, 'relax')}; plan: {plan['target']}, {len(plan['checks'])} checks")
    if args.device == "cuda":
        cuda_runtime_loads(tvm, log)
        gpu = tvm.cuda(0)
        log(f"GPU: {gpu.device_name if gpu.exist else 'none'}, compute capability "
            f"{gpu.compute_version if gpu.exist else '-'}")
    results, runtimes = run_checks(plan, args.carry, args.device, log)
    failed = [r for r in results if r["status"] != "ok"]
    log(f"\nnumerics: {len(results) - len(failed)} of {len(results)} runs within {plan['tolerance']:g}")
    rows = [] if args.no_timing else time_kernels(plan, args.carry, runtimes, args.device, log)
    if rows:
        (args.out / "table.md").write_text(table(rows))
        log("\n" + table(rows))
    (args.out / "results.json").write_text(json.dumps({"numerics": results, "timing": rows}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
