"""The CPU half of the GPU check (issue 14, part 2): compile for the GPU here, compute the references here,
and gather everything the GPU machine lacks into one folder to carry there.

The GPU machine has Python 3.12, a CUDA torch and nvcc, but no TVM and no structfx compiler. This writes
``OUT/`` (default benchmarks/gpu_carry/, under 64 MiB):

    site/           tvm (runtime only), tvm_ffi for the GPU's Python, safetensors, structfx's runtime
    lib/            libcudart.so.13, which TVM's CUDA runtime links (used only where the GPU has none)
    wheels/         numpy for the GPU's Python (unpacked there only if it has no numpy)
    artifacts/NAME/ one saved artifact per check (compiled for --target)
    cases/NAME/     inputs and float64 CPU references (.npy) for each batch size
    plan.json       what to run: every check's artifact, inputs, tolerance, and for the timed kernels
                    the timed shape, bytes moved and flops of one call (their inputs are made there)

    python benchmarks/gpu_check/prepare.py [--target "cuda -arch=sm_90"] [--python-version 3.12] [--out DIR]

``--target llvm --python-version 3.11`` prepares the same check for this CPU: how it is tested without
a GPU (tests/runtime/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import structfx as sfx  # noqa: E402
from structfx.nn import BTTLinear, SparseMaxPlus, SPMLinear  # noqa: E402
from structfx.passes.cost import ops_per_row  # noqa: E402
from structfx.runtime.bundle import TVM_FFI_BUILD_ONLY, write_runtime_bundle  # noqa: E402

BATCHES = (1, 7, 33)
TIMED_BATCH, TIMED_SIZES = 256, (1024, 4096)
TOLERANCE = 1e-4  # relative (Frobenius) error against the float64 CPU reference
CUDART = Path("/usr/local/cuda/lib64/libcudart.so.13")


def _save_case(root: Path, name: str, inputs: dict[int, tuple], references: dict[int, tuple]) -> list[dict]:
    """Inputs and references per batch as .npy under cases/NAME/; the plan's entries for them."""
    folder = root / "cases" / name
    folder.mkdir(parents=True)
    runs = []
    for batch, xs in inputs.items():
        entry = {"batch": batch, "inputs": [], "references": []}
        for kind, arrays in (("inputs", xs), ("references", references[batch])):
            for i, array in enumerate(arrays):
                path = folder / f"b{batch}_{kind[:-1]}{i}.npy"
                np.save(path, array)
                entry[kind].append(str(path.relative_to(root)))
        runs.append(entry)
    return runs


def _compile(root: Path, name: str, model: nn.Module, example, target: str) -> str:
    compiled = sfx.compile(model, example, target=target)
    return str(compiled.save(root / "artifacts" / name).relative_to(root))


def catalogue_checks(root: Path, target: str, limit: int | None = None) -> list[dict]:
    """The test catalogue's op cases (odd and prime sizes), each at batch 1, 7 and 33."""
    from tests.cases import CASES

    checks = []
    for case in CASES[:limit]:
        module = case.make()  # float64, seeded
        single = _float_copy(module)
        inputs, references = {}, {}
        for batch in BATCHES:
            x = case.inputs(batch, seed=batch).float()
            with torch.no_grad():
                want = case.reference(module, x.double())
            inputs[batch], references[batch] = (x.numpy(),), (want.numpy(),)
        artifact = _compile(root, case.name, single, case.inputs(5).float(), target)
        checks.append({"name": case.name, "kind": "op", "artifact": artifact,
                       "runs": _save_case(root, case.name, inputs, references)})
    return checks


def _float_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).float().eval()


def model_checks(root: Path, target: str) -> list[dict]:
    """Whole models: the demo's digits MLP and a tiny BERT, each transformed with BTT + MaxPlus."""
    from structfx.demo import build_models, load_data
    from tests.passes.models import tiny_bert

    torch.manual_seed(0)
    data = load_data()
    digits = sfx.transform(build_models()["dense (ReLU)"], [sfx.BTT(rank=2), sfx.MaxPlus(k=2)],
                           example_inputs=(data.x_test[:8],)).eval()
    bert, (ids,) = tiny_bert()
    bert = sfx.transform(bert, [sfx.BTT(rank=2), sfx.MaxPlus(k=2)], example_inputs=(ids,)).eval()
    generator = torch.Generator().manual_seed(0)
    models = {
        "digits_mlp_btt_maxplus": (digits, data.x_test[:8], {b: data.x_test[:b] for b in BATCHES}),
        "tiny_bert_btt_maxplus": (bert, ids, {b: torch.randint(0, 100, (b, 16), generator=generator)
                                             for b in BATCHES}),
    }
    checks = []
    for name, (model, example, batches) in models.items():
        inputs, references = {}, {}
        for batch, x in batches.items():
            with torch.no_grad():
                out = model.double()(x.double() if x.is_floating_point() else x)
            model.float()
            leaves = torch.utils._pytree.tree_leaves(out)
            inputs[batch], references[batch] = (x.numpy(),), tuple(leaf.numpy() for leaf in leaves)
        artifact = _compile(root, name, model, example, target)
        checks.append({"name": name, "kind": "model", "artifact": artifact,
                       "runs": _save_case(root, name, inputs, references)})
    return checks


def timed_kernels(root: Path, target: str) -> list[dict]:
    """The four kernels at B = 256 and d = 1024, 4096, with the bytes and flops of one call."""
    checks = []
    for d in TIMED_SIZES:
        layers = {"btt_r1": BTTLinear(d, d, 1), "btt_r4": BTTLinear(d, d, 4), "spm": SPMLinear(d, d),
                  "maxplus_k2": SparseMaxPlus(d, d, 2)}
        for op, layer in layers.items():
            torch.manual_seed(0)
            layer = layer.eval()
            name = f"{op}_{d}"
            x = torch.randn(BATCHES[1], d)  # numerics at a small batch; timing on random (256, d) made there
            with torch.no_grad():
                want = layer.double()(x.double())
            layer.float()
            artifact = _compile(root, name, layer, x, target)
            weight_bytes = 4 * sum(p.numel() for p in layer.parameters())
            # max-plus: an add and a max per (output, entry); the linear layers: a multiply-add per op
            flops = 2 * TIMED_BATCH * ops_per_row(layer)
            checks.append({
                "name": name, "kind": "timed", "artifact": artifact, "op": op, "d": d, "batch": TIMED_BATCH,
                "bytes": 4 * TIMED_BATCH * 2 * d + weight_bytes, "flops": flops,
                "runs": _save_case(root, name, {BATCHES[1]: (x.numpy(),)}, {BATCHES[1]: (want.numpy(),)}),
            })
    return checks


def site_packages(root: Path, python_version: str) -> None:
    """The runtime bundle, with tvm_ffi swapped for the GPU Python's build and safetensors beside it."""
    site = root / "site"
    write_runtime_bundle(site)
    import safetensors

    shutil.copytree(Path(safetensors.__file__).parent, site / "safetensors",  # one abi3 build for every Python
                    ignore=shutil.ignore_patterns("__pycache__"))
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python_version == here:
        return
    import tvm_ffi

    wheels = root / "wheels"
    for requirement in (f"apache-tvm-ffi=={tvm_ffi.__version__}", f"numpy=={np.__version__}"):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", requirement, "--no-deps",
                        "--only-binary=:all:", "--python-version", python_version,
                        "--platform", f"manylinux_2_28_{platform.machine()}", "-d", str(wheels)], check=True)
    for old in [site / "tvm_ffi", *site.glob("apache_tvm_ffi-*.dist-info")]:
        shutil.rmtree(old)
    (wheel,) = wheels.glob("apache_tvm_ffi-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    wheel.unlink()  # numpy's wheel stays: gpu_check.sh unpacks it where the machine has no numpy
    for name in TVM_FFI_BUILD_ONLY:
        path = site / "tvm_ffi" / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cuda -arch=sm_90")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu_carry")
    parser.add_argument("--only", choices=["ops", "models", "timed"], nargs="*", help="a subset (for tests)")
    parser.add_argument("--limit", type=int, help="at most this many op cases (for tests)")
    args = parser.parse_args()
    root = args.out
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    site_packages(root, args.python_version)
    if args.target.startswith("cuda") and CUDART.is_file():
        (root / "lib").mkdir()
        shutil.copy2(CUDART.resolve(), root / "lib" / CUDART.name)
    parts = {"ops": lambda root, target: catalogue_checks(root, target, args.limit), "models": model_checks,
             "timed": timed_kernels}
    checks = [c for part in (args.only or parts) for c in parts[part](root, args.target)]
    plan = {"target": args.target, "tolerance": TOLERANCE, "python": args.python_version, "checks": checks}
    (root / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"{root}: {len(checks)} checks, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
