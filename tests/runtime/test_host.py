"""TVM's CPU thread pool sized to the physical cores (structfx/runtime/host.py: use_every_core), on every thread
that runs a compiled model, without changing the user's environment."""

import json
import os
import subprocess
import sys

from structfx.runtime import host

#: Compiles and runs a model on the main thread and on a second thread, then reports the environment and each
#: thread's TVM pool size. Run in a fresh interpreter: TVM's pools are per thread and sized once. torch.export
#: itself sets TORCHINDUCTOR_CACHE_DIR (to its default) on first use: the environment is read after it ran.
RUN = """
import json, os, threading, torch, structfx as sfx
from structfx.lowering.compat import tvm
model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
torch.export.export(model, (torch.randn(4, 8),))
before = dict(os.environ)
compiled = sfx.compile(model, torch.randn(4, 8))
threads = {}
def run(name):
    compiled(torch.randn(3, 8))
    threads[name] = tvm.get_global_func("runtime.NumThreads")()
run("main")
worker = threading.Thread(target=run, args=("worker",))
worker.start()
worker.join()
print(json.dumps({"same_env": dict(os.environ) == before, "threads": threads}))
"""


def _run(env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def _without_thread_counts() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}


def test_physical_cores_within_the_allowed_cpus():
    assert 1 <= host.physical_cores() <= len(host.allowed_cpus()) == len(os.sched_getaffinity(0))


def test_every_thread_runs_on_every_physical_core_and_the_environment_is_left_alone():
    """TVM alone takes half of the CPUs on x86 (one thread on a 2-core VM without SMT); structfx used to set
    TVM_NUM_THREADS in os.environ to fix that, which stayed set after the call."""
    report = _run(_without_thread_counts())
    assert report["same_env"]
    assert report["threads"] == {"main": host.physical_cores(), "worker": host.physical_cores()}


def test_a_thread_count_the_user_set_wins():
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        report = _run({**_without_thread_counts(), name: "1"})
        assert report["same_env"]
        assert report["threads"] == {"main": 1, "worker": 1}
