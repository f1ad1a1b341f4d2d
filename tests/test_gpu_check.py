"""benchmarks/gpu_check.sh, tested without a GPU: prepared for this CPU (--target llvm, this Python), its
second half runs the carried artifacts from the carried runtime-only TVM and checks them."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_prepared_for_the_cpu_runs_from_its_carry_folder(tmp_path):
    carry = tmp_path / "carry"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check/prepare.py"), "--target", "llvm",
                    "--python-version", here, "--only", "ops", "--limit", "2", "--out", str(carry)],
                   check=True, capture_output=True)
    plan = json.loads((carry / "plan.json").read_text())
    assert [c["name"] for c in plan["checks"]] == ["maxplus_37x23_k3", "maxplus_16x16_relu"]
    assert not list(carry.rglob("libtvm_compiler.so")) and (carry / "site/tvm/lib/libtvm_runtime.so").is_file()
    env = {**os.environ, "PYTHONPATH": str(carry / "site"), "TVM_USE_RUNTIME_LIB": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check/check.py"), "--carry", str(carry),
                           "--out", str(tmp_path / "out"), "--device", "cpu", "--no-timing"],
                          env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "out/log.txt").read_text()
    assert f"from {carry / 'site/tvm/__init__.py'}, runtime only: True" in log
    assert "numerics: 6 of 6 runs within 0.0001" in log
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert all(r["status"] == "ok" and r["error"] < 1e-4 for r in results["numerics"])
