"""``pip install .`` (a wheel, not editable) carries what the commands need: `structfx bench` runs the
installed benchmarks from outside the source tree, and sys.argv is left alone."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_wheel_install_runs_structfx_bench(tmp_path):
    site, source = tmp_path / "site", tmp_path / "source"  # a copy: the build writes build/ and egg-info into it
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "out", "gpu_carry", "gpu_out", "build", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True)
    assert (site / "structfx/benchmarks/bench_layers.py").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    for args, expected in [(["bench", "--help"], "Run one of benchmarks/"),
                           (["bench", "layers", "--", "--help"], "usage: bench_layers.py")]:
        done = subprocess.run([sys.executable, "-m", "structfx", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0 and expected in done.stdout, done.stdout + done.stderr
    where = subprocess.run([sys.executable, "-c", "import structfx.cli as c; print(c.benchmarks_folder())"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(site / "structfx/benchmarks")


def test_bench_leaves_sys_argv_alone(monkeypatch):
    from typer.testing import CliRunner

    from structfx.cli import app

    monkeypatch.setattr(sys, "argv", ["pytest", "--marker"])
    result = CliRunner().invoke(app, ["bench", "layers", "--", "--help"])
    assert result.exit_code == 0 and sys.argv == ["pytest", "--marker"]
