"""TVM's CPU thread pool sized to the physical cores (structfx/runtime/host.py: use_every_core)."""

import os
import subprocess
import sys

from structfx.runtime import host


def test_physical_cores_within_the_allowed_cpus():
    assert 1 <= host.physical_cores() <= len(os.sched_getaffinity(0))


def test_a_thread_count_the_user_set_wins(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    host.use_every_core()
    assert os.environ["TVM_NUM_THREADS"] == "3"
    monkeypatch.delenv("TVM_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    host.use_every_core()
    assert "TVM_NUM_THREADS" not in os.environ


def test_tvm_runs_on_every_physical_core_once_structfx_is_imported():
    """TVM alone takes half of the CPUs on x86 (one thread on a 2-core VM without SMT)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    code = ("import structfx.lowering.compat as c; from structfx.runtime.host import physical_cores; "
            "print(c.tvm.get_global_func('runtime.NumThreads')(), physical_cores())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    threads, cores = out.split()
    assert threads == cores
