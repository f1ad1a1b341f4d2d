"""What this CPU can run: read by the compiler (to pick a target) and the runtime (to check one)."""

from __future__ import annotations

import os
from pathlib import Path

#: Base x86 features whose absence must be told to LLVM: a CPU name alone (e.g. "znver4" on a virtual
#: machine that hides AVX-512) lets it emit instructions the host cannot run.
X86_FEATURES = ("avx512f", "avx2", "fma", "avx")


def cpu_flags() -> set[str]:
    """The CPU flags the OS reports (Linux), or the X86_FEATURES where it reports none."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set(X86_FEATURES)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once), from Linux's
    sysfs topology; the count of those CPUs where the topology is not readable."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(allowed)
    return max(1, len(cores))


def use_every_core() -> None:
    """Size TVM's CPU thread pool to ``physical_cores()`` unless TVM_NUM_THREADS or OMP_NUM_THREADS is set.

    TVM's default on x86 is half the CPUs the OS reports (it assumes every core has two hardware threads):
    one thread on a 2-core virtual machine without SMT, so compiled kernels ran on one core while torch
    ran on two. TVM reads the variable once, when a thread first runs a parallel kernel: call this before
    that (structfx does, before it imports TVM)."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
