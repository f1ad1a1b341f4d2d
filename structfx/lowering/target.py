"""Which machine the kernels are built for: the host CPU by default, detected rather than hard-coded."""

from __future__ import annotations

import os
import platform

from structfx.errors import StructfxError
from structfx.lowering.compat import Target, codegen, tvm
from structfx.runtime.host import X86_FEATURES, cpu_flags


def host_target() -> Target:
    """The host CPU as an LLVM target: explicit triple, the CPU LLVM detects, minus features the OS
    does not report; ``llvm`` with defaults where detection fails."""
    machine = platform.machine()
    cpu = codegen.llvm_get_system_cpu()
    if platform.system() != "Linux" or machine not in ("x86_64", "aarch64") or not codegen.llvm_is_valid_cpu(
        cpu, f"{machine}-linux-gnu"
    ):
        return Target({"kind": "llvm", "num-cores": os.cpu_count() or 1})
    spec = {"kind": "llvm", "mtriple": f"{machine}-linux-gnu", "mcpu": cpu, "num-cores": _cores()}
    missing = [f"-{f}" for f in X86_FEATURES if machine == "x86_64" and f not in cpu_flags()]
    if missing:
        spec["mattr"] = missing
    return Target(spec)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_target(target: object = None) -> Target:
    """``None``/``"llvm"``/``"cpu"``: the host; ``"cuda"`` (this machine's GPU), ``"cuda -arch=sm_90"``,
    a dict or a Target. Raises StructfxError for anything else, and for ``"cuda"`` without a GPU."""
    if target is None or target in ("llvm", "cpu"):
        return host_target()
    if isinstance(target, Target):
        resolved = target
    elif isinstance(target, (str, dict)):
        spec = _cuda_spec(target) if isinstance(target, str) and target.startswith("cuda") else target
        try:
            resolved = Target(spec)
        except Exception as e:  # TVM's own parse errors are long C++ traces: keep the gist
            raise StructfxError(f"target {target!r} is not a TVM target: {str(e).splitlines()[0]}") from e
    else:
        raise StructfxError(f"target must be a string, a dict or a tvm Target, got {type(target).__name__}")
    if resolved.kind.name not in ("llvm", "cuda"):
        raise StructfxError(f"target kind {resolved.kind.name!r} is not supported; use 'llvm' (CPU) or 'cuda'")
    if resolved.kind.name == "cuda" and resolved.host is None:
        resolved = Target(resolved, host=host_target())  # the VM and shape code run on this CPU
    return resolved


def _cuda_spec(text: str) -> dict:
    """``"cuda -arch=sm_90"`` in the dict form this TVM takes. Without ``-arch``, the architecture of
    this machine's GPU; with no GPU present there is nothing to detect, and the arch must be given."""
    spec: dict = {"kind": "cuda"}
    for flag in text.split()[1:]:
        key, _, value = flag.lstrip("-").partition("=")
        spec[key] = value
    if "arch" not in spec:
        gpu = tvm.cuda(0)
        if not gpu.exist:
            raise StructfxError(
                f"target {text!r} names no architecture and this machine has no CUDA GPU to detect one from: "
                f"give the deployment GPU's, e.g. 'cuda -arch=sm_90' (H100/H200) or 'cuda -arch=sm_80' (A100)"
            )
        spec["arch"] = "sm_" + gpu.compute_version.replace(".", "")
    return spec
