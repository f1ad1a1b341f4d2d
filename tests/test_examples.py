"""The examples run, in a reduced form (each takes under 5 minutes at full size on 2 cores)."""

import subprocess
import sys


def _run(*args) -> str:
    return subprocess.run([sys.executable, *map(str, args)], check=True, capture_output=True, text=True).stdout


def test_digits_end_to_end(tmp_path):
    out = _run("examples/digits_end_to_end.py", "--epochs", 3, "--out", tmp_path)
    assert "| saved + loaded (runtime) |" in out
    assert (tmp_path / "digits_end_to_end.png").is_file() and (tmp_path / "digits.sfx" / "manifest.json").is_file()


def test_bert_compress(tmp_path):
    out = _run("examples/bert_compress.py", "--hidden", 64, "--layers", 1, "--fit-steps", 5, "--out", tmp_path)
    assert "| BTT rank 1 |" in out and "| SPM general |" in out
    assert (tmp_path / "bert_compress.png").is_file()
