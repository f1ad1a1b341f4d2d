"""tune(): measured records kept, resumed, killed and reloaded, used by compile; local and over RPC.

Budgets are tiny (CI has 2 cores); what is checked is the bookkeeping, not the speed-ups."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.target import resolve_target
from structfx.lowering.tuning.database import HEADER, RECORDS, TuningDatabase


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
    assert {"structfx_sparse_maxplus", "layer_norm"} <= kernels  # the matmul rule has no knobs
    compiled = sfx.compile(model, x, database=tmp_path / "db")
    with torch.no_grad():
        want = model(x)
    assert float((compiled(x) - want).norm() / want.norm()) < 1e-4


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
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(_records(database)) < 3 and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
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
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(port), "--port-end", str(port + 1)])
    servers = []
    try:
        _wait_for_port(port)
        for _ in range(2):
            servers.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                             "--tracker", f"127.0.0.1:{port}", "--key", "structfx-test"]))
        time.sleep(4)
        model, x = _model()
        sfx.tune(model, x, trials=3, database=tmp_path / "db", rpc=f"127.0.0.1:{port}", key="structfx-test",
                 progress=False)
        assert len(_records(tmp_path / "db")) == 3
    finally:
        for process in [*servers, tracker]:
            process.terminate()
            process.wait(timeout=10)
