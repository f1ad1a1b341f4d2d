"""What this CPU can run: read by the compiler (to pick a target) and the runtime (to check one)."""

from __future__ import annotations

import os
import threading
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


def allowed_cpus() -> list[int]:
    """The CPUs this thread may run on (Linux's affinity mask; every CPU elsewhere)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once), from Linux's
    sysfs topology; the count of those CPUs where the topology is not readable."""
    allowed = allowed_cpus()
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(allowed)
    return max(1, len(cores))


#: TVM's ThreadGroup affinity mode kSpecifyThreadShareAllCore (thread_pool.cc): every worker may run on
#: every CPU of the list given, here the CPUs this process may use.
SHARE_ALL_CORES = -3
_sized = threading.local()


def use_every_core() -> None:
    """Size the calling thread's TVM CPU thread pool to ``physical_cores()`` unless TVM_NUM_THREADS or
    OMP_NUM_THREADS is set; ``os.environ`` is left as it was.

    TVM's default on x86 is half the CPUs the OS reports (it assumes every core has two hardware threads):
    one thread on a 2-core virtual machine without SMT, so compiled kernels ran on one core while torch
    ran on two. TVM keeps one pool per calling thread, configured through its ``runtime.config_threadpool``
    function (the fourth argument is the pool's maximum concurrency): structfx calls this on each thread
    before it runs kernels there; after a thread's first call it costs one attribute lookup."""
    if getattr(_sized, "done", False) or "TVM_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in os.environ:
        return
    import tvm

    cores = physical_cores()
    cpus = [str(cpu) for cpu in allowed_cpus()]
    tvm.get_global_func("runtime.config_threadpool")(SHARE_ALL_CORES, cores, cpus, cores)
    _sized.done = True
