"""Every command through typer's runner: results, --help, and exit code 2 with one line on user error."""

import numpy as np
import pytest
from typer.testing import CliRunner

from structfx.cli import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", ["demo", "compile", "tune", "inspect", "run", "bench"])
def test_every_command_has_help(command):
    result = _invoke(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mlp.sfx"
    result = _invoke("compile", "examples/models.py:mlp", "--rules", "btt:rank=2,maxplus:k=2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "replaced" in result.output and f"saved {out}" in result.output
    return out


def test_inspect_shows_the_manifest(artifact):
    result = _invoke("inspect", artifact)
    assert result.exit_code == 0
    assert "input: input: (batch, 64) float32" in result.output
    kernels = next(line for line in result.output.splitlines() if line.startswith("kernels:"))
    assert "structfx_btt" in kernels and "structfx_sparse_maxplus" in kernels
    assert "file: kernels.so" in result.output


def test_run_saves_the_output(artifact, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32))
    result = _invoke("run", artifact, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "y.npy").shape == (5, 10)


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "no/such/dir"], "is not a structfx artifact"),
        (["compile", "examples/models.py:nothing", "--out", "x"], "has no function 'nothing'"),
        (["compile", "missing.py:build", "--out", "x"], "missing.py does not exist"),
        (["compile", "examples/models.py:mlp", "--rules", "dense:k=1", "--out", "x"], "unknown rule 'dense'"),
        (["compile", "examples/models.py:mlp", "--rules", "btt:rank=two", "--out", "x"], "btt:rank='two' must be"),
        (["compile", "examples/models.py:mlp", "--target", "metal", "--out", "x"], "not supported"),
        (["bench", "nothing"], "no benchmark 'nothing'"),
        (["tune", "examples/models.py:mlp", "--database", "db", "--rpc", "nohost", "--key", "k"], "HOST:PORT"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, message):
    result = _invoke(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_run_with_a_wrong_shape_or_path(artifact, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((5, 63), np.float32))
    result = _invoke("run", artifact, "--input", tmp_path / "bad.npy")
    assert result.exit_code == 2 and "expected input: (batch, 64) float32" in result.output
    result = _invoke("run", artifact, "--input", tmp_path / "none.npy")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_compile_refuses_to_overwrite(artifact):
    result = _invoke("compile", "examples/models.py:mlp", "--out", artifact)
    assert result.exit_code == 2 and "exists and is not empty" in result.output and "--overwrite" in result.output


BUILDERS = '''
import pathlib
import torch

def raises():
    raise ValueError("boom")

def counted():
    pathlib.Path(__file__).with_name("built").touch()
    return torch.nn.Linear(4, 4), (torch.randn(2, 4),)
'''


@pytest.fixture
def builders(tmp_path):
    (tmp_path / "builders.py").write_text(BUILDERS)
    return tmp_path


def test_a_failing_builder_is_one_line_naming_it_and_its_exception(builders):
    result = _invoke("compile", f"{builders}/builders.py:raises", "--out", builders / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == f"error: the builder {builders}/builders.py:raises raised ValueError: boom"
    (builders / "broken.py").write_text("import no_such_module_anywhere\n")
    result = _invoke("tune", f"{builders}/broken.py:build", "--database", builders / "db")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert f"importing {builders}/broken.py failed: ModuleNotFoundError" in result.output


@pytest.mark.parametrize("option, message", [
    ("out", "exists and is not empty; choose another --out or pass --overwrite"),
    ("database", "does not exist; make one with 'structfx tune'"),
    ("rules", "unknown rule 'dense'"),
])
def test_compile_checks_its_options_before_building(builders, option, message):
    taken = builders / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("user data")
    args = {"out": ["--out", taken], "database": ["--out", builders / "new", "--database", builders / "none"],
            "rules": ["--out", builders / "new", "--rules", "dense:k=1"]}[option]
    result = _invoke("compile", f"{builders}/builders.py:counted", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (builders / "built").exists()  # the builder never ran
    assert (taken / "mine.txt").read_text() == "user data"
