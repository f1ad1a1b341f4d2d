"""tune(): measured records kept, resumed, killed and reloaded, used by compile; local and over RPC; no
process or temporary directory left behind.

Budgets are tiny (CI has 2 cores); what is checked is the bookkeeping, not the speed-ups."""

import collections
import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import uuid

import psutil
import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.target import resolve_target
from structfx.lowering.tuning.database import HEADER, RECORDS, TuningDatabase
from structfx.lowering.tuning.tasks import extract_tasks, samples_anything, standard_space, workload_of

#: torch.export's compile cache (torch's own, kept between runs by design): the only thing tune may leave
TORCH_CACHE = f"torchinductor_{getpass.getuser()}"


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path, monkeypatch):
    """Every test here runs with its own temporary directory, and must leave it empty and no child process."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield
    assert not psutil.Process().children(recursive=True)
    assert [p.name for p in scratch.iterdir() if p.name != TORCH_CACHE] == []


def _model():
    torch.manual_seed(0)
    return nn.Sequential(sfx.SparseMaxPlus(128, 128, k=2)).eval(), torch.randn(32, 128)


def _records(database) -> list[dict]:
    path = database / RECORDS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_tune_resume_and_compile(tmp_path):
    model, x = _model()
    database = tmp_path / "db"
    sfx.tune(model, x, trials=3, database=database, progress=False)
    first = _records(database)
    assert len(first) == 3 and sum(r["hand"] for r in first) == 1
    sfx.tune(model, x, trials=3, database=database, progress=False)  # nothing left to measure
    assert _records(database) == first
    sfx.tune(model, x, trials=5, database=database, progress=False)  # continues: 2 more, the 3 kept
    assert len(_records(database)) == 5 and _records(database)[:3] == first
    compiled = sfx.compile(model, x, database=database)
    with torch.no_grad():
        want = model(x)
    assert float((compiled(x) - want).norm() / want.norm()) < 1e-4


def test_the_rest_of_the_module_is_tuned_too(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), sfx.SparseMaxPlus(64, 64), nn.LayerNorm(64)).eval()
    x = torch.randn(16, 64)
    sfx.tune(model, x, trials=2, database=tmp_path / "db", progress=False)
    kernels = {r["kernel"] for r in _records(tmp_path / "db")}
    assert {"structfx_sparse_maxplus", "layer_norm"} <= kernels  # the matmul schedule rule has no knobs
    compiled = sfx.compile(model, x, database=tmp_path / "db")
    for rows in (16, 7, 300):  # traces tuned at 256 rows, replayed on the symbolic batch: fewer and more rows
        batch = torch.randn(rows, 64)
        with torch.no_grad():
            want = model(batch)
        assert float((compiled(batch) - want).norm() / want.norm()) < 1e-4


def test_no_trial_goes_to_a_kernel_with_nothing_to_tune(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Linear(48, 40).eval(), torch.randn(16, 48)
    sfx.tune(model, x, trials=3, database=tmp_path / "db", progress=False)
    measured = collections.Counter(r["kernel"] for r in _records(tmp_path / "db"))
    assert measured == {"fused_dense_packed_add": 3}  # the bias add is fused into the matmul's kernel
    from structfx.lowering.build import legalize_module, lower_to_relax
    from structfx.lowering.export import export_for_compile

    target = resolve_target()
    mod = legalize_module(lower_to_relax(export_for_compile(model, (x,)), target)[0], target)
    tasks = {t.name for t in extract_tasks(mod, target)}
    assert tasks == {"fused_dense_packed_add"}
    for gv, func in mod.functions_items():
        if gv.name_hint not in tasks and hasattr(func, "buffer_map"):
            assert not samples_anything(workload_of(func), standard_space(), target), gv.name_hint


def test_compile_keeps_the_hand_schedule_when_it_is_the_best_record(tmp_path):
    model, x = _model()
    sfx.tune(model, x, trials=1, database=tmp_path / "db", progress=False)
    (record,) = _records(tmp_path / "db")
    assert record["hand"]
    with torch.no_grad():
        assert torch.equal(sfx.compile(model, x, database=tmp_path / "db")(x), sfx.compile(model, x)(x))


BUILD = """
import torch
from torch import nn
import structfx as sfx

def build():
    torch.manual_seed(0)
    return nn.Sequential(sfx.SparseMaxPlus(128, 128, k=2)).eval(), torch.randn(32, 128)
"""


def test_a_killed_run_leaves_a_database_that_loads_and_resumes(tmp_path):
    (tmp_path / "model.py").write_text(BUILD)
    database = tmp_path / "db"
    command = [sys.executable, "-m", "structfx", "tune", f"{tmp_path / 'model.py'}:build",
               "--database", str(database), "--trials", "200"]
    scratch = tmp_path / "tmpdir"  # a killed run cannot remove its build directory: keep it out of the real one
    scratch.mkdir()
    process = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(_records(database)) < 3 and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # its measuring worker too
        process.wait()
        _wait_for_group_exit([process.pid])
    kept = (database / RECORDS).read_bytes()
    kept = kept[: kept.rindex(b"\n") + 1]  # whatever was flushed whole
    (database / RECORDS).write_bytes(kept + b'{"kernel": "structfx_sparse_ma')  # and a torn line after it
    survivors = TuningDatabase(database, resolve_target(), create=False).records
    assert len(survivors) >= 3 and (database / RECORDS).read_bytes() == kept
    model, x = _model()
    sfx.tune(model, x, trials=len(survivors) + 2, database=database, progress=False)
    assert len(_records(database)) == len(survivors) + 2  # no record lost, none measured again
    assert (database / RECORDS).read_bytes().startswith(kept)


def test_a_database_for_another_target_or_tvm_is_refused(tmp_path):
    model, x = _model()
    sfx.tune(model, x, trials=1, database=tmp_path / "db", progress=False)
    header = json.loads((tmp_path / "db" / HEADER).read_text())
    (tmp_path / "db" / HEADER).write_text(json.dumps({**header, "tvm_version": "0.1.0"}))
    with pytest.raises(sfx.StructfxError, match="tuned with tvm_version 0.1.0; this run uses"):
        sfx.compile(model, x, database=tmp_path / "db")
    (tmp_path / "db" / HEADER).write_text(json.dumps({**header, "target": '{"kind": "cuda"}'}))
    with pytest.raises(sfx.StructfxError, match="tuned with target"):
        sfx.tune(model, x, trials=2, database=tmp_path / "db", progress=False)


def test_an_unreachable_tracker_fails_within_seconds(tmp_path):
    model, x = _model()
    start = time.time()
    with pytest.raises(sfx.StructfxError, match="cannot reach the RPC tracker at 127.0.0.1:9"):
        sfx.tune(model, x, trials=2, database=tmp_path / "db", rpc="127.0.0.1:9", key="cpu")
    assert time.time() - start < 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def test_tuning_through_a_tracker_and_two_servers(tmp_path):
    port = _free_port()
    # each in a session of its own: tracker and servers run their services in popen_worker children,
    # which a signal to the parent alone would leave running
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(port), "--port-end", str(port + 1)], start_new_session=True)
    servers = []
    try:
        _wait_for_port(port)
        for _ in range(2):
            servers.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                             "--tracker", f"127.0.0.1:{port}", "--key", "structfx-test"],
                                            start_new_session=True))
        time.sleep(4)
        model, x = _model()
        sfx.tune(model, x, trials=3, database=tmp_path / "db", rpc=f"127.0.0.1:{port}", key="structfx-test",
                 progress=False)
        assert len(_records(tmp_path / "db")) == 3
    finally:
        for process in [*servers, tracker]:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        _wait_for_group_exit([p.pid for p in [*servers, tracker]])


def _wait_for_group_exit(groups: list[int], seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        alive = [p for p in psutil.process_iter() if _group(p) in groups]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"still running: {[p.cmdline() for p in alive]}")


def _group(process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return None


def test_the_tune_command_leaves_no_process_and_no_temporary_directory(tmp_path):
    (tmp_path / "model.py").write_text(BUILD)
    scratch, marker = tmp_path / "tmpdir", uuid.uuid4().hex
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "STRUCTFX_TEST_MARKER": marker}
    subprocess.run([sys.executable, "-m", "structfx", "tune", f"{tmp_path / 'model.py'}:build", "--database",
                    str(tmp_path / "db"), "--trials", "2"], env=env, check=True, capture_output=True)
    assert len(_records(tmp_path / "db")) == 2
    assert [p.name for p in scratch.iterdir() if p.name != TORCH_CACHE] == []
    assert [p.cmdline() for p in psutil.process_iter() if _has_marker(p, marker)] == []


def _has_marker(process, marker: str) -> bool:
    try:
        return process.environ().get("STRUCTFX_TEST_MARKER") == marker
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


class _TimedOut:
    """A runner whose every measurement was stopped at its timeout, as LocalRunner reports it."""

    class _Future:
        def result(self):
            return types.SimpleNamespace(error_msg="LocalRunner: Timeout, killed after 30 seconds\n", run_secs=None)

    def run(self, inputs):
        return [self._Future() for _ in inputs]


def test_a_hand_schedule_slower_than_the_timeout_is_filed_as_infinitely_slow(tmp_path):
    from structfx.lowering.build import legalize_module, lower_to_relax
    from structfx.lowering.export import export_for_compile
    from structfx.lowering.tuning.database import workload_hash
    from structfx.lowering.tuning.tune import InProcessBuilder, _measure_hand_schedule

    model, x = _model()
    target = resolve_target()
    mod = legalize_module(lower_to_relax(export_for_compile(model, (x,)), target)[0], target)
    (task,) = extract_tasks(mod, target)
    record = _measure_hand_schedule(task, target, workload_hash(task.workload), InProcessBuilder(tmp_path), _TimedOut())
    assert record.hand and record.seconds == float("inf")
    db = TuningDatabase(tmp_path / "db", target, create=True)
    db.add(record)
    assert TuningDatabase(tmp_path / "db", target, create=False).best(record.workload).seconds == float("inf")
    with torch.no_grad():  # the only record is the hand schedule: compile keeps it
        assert torch.equal(sfx.compile(model, x, database=tmp_path / "db")(x), sfx.compile(model, x)(x))



def test_a_run_stopped_between_build_and_measurement_leaves_no_candidate_library(tmp_path, monkeypatch):
    """A batch's first candidate is built (its directory made) and the second's build is interrupted: the
    first is never measured, so MetaSchedule's RemoveBuildArtifact never sees it; the run's directory goes."""
    from structfx.lowering.compat import tvm

    compile_, built = tvm.compile, []

    def compile_then_stop(*args, **kwargs):
        built.append(args)
        if len(built) == 3:  # the hand schedule, one candidate, then the interruption
            raise KeyboardInterrupt
        return compile_(*args, **kwargs)

    monkeypatch.setattr(tvm, "compile", compile_then_stop)
    model, x = _model()
    with pytest.raises((KeyboardInterrupt, RuntimeError)):  # TVM's FFI hands it on as a RuntimeError
        sfx.tune(model, x, trials=4, database=tmp_path / "db", progress=False)
    assert len(built) == 3  # the fixture checks that the temporary directory is empty again

