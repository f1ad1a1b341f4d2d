"""A saved artifact carries in-place updates as the compiled model does: the numpy arrays (or torch
tensors) the forward writes hold eager's values after each call, the updated buffers are the runtime's own
state from their values when it was saved, and inputs that cannot take the write are refused."""

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.runtime import load


class Accumulating(nn.Module):
    """Writes both its inputs (one through a view) and a call counter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x, total):
        total.add_(x.sum(0))
        x[:, :2].mul_(2)
        self.n += 1
        return self.fc(x) + total + self.n


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Accumulating().eval()
    compiled = sfx.compile(model, (torch.randn(3, 4), torch.zeros(4)))
    compiled(torch.randn(2, 4), torch.zeros(4))  # the counter is 1 when saved
    with torch.no_grad():
        model(torch.randn(2, 4), torch.zeros(4))
    path = compiled.save(tmp_path_factory.mktemp("mut") / "model.sfx")
    return model, load(path), path, copy.deepcopy(model)


def _inputs(seed: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    return generator.standard_normal((batch, 4), dtype=np.float32), generator.standard_normal(4, dtype=np.float32)


def _eager(model, x: np.ndarray, total: np.ndarray):
    """model's output, x and total after an eager call on copies of them."""
    x, total = torch.from_numpy(x.copy()), torch.from_numpy(total.copy())
    with torch.no_grad():
        return model(x, total).numpy(), x.numpy(), total.numpy()


def test_written_arrays_and_the_state_follow_eager_across_calls(saved):
    model, runtime, _, _ = saved
    assert runtime.manifest["mutations"] == {"inputs": [[0, 1], [1, 2]], "state": [["n", 0]]}
    for seed, batch in ((0, 3), (1, 5), (2, 1)):
        x, total = _inputs(seed, batch)
        want, want_x, want_total = _eager(model, x, total)
        np.testing.assert_allclose(runtime(x, total), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x, want_x, rtol=1e-6)
        np.testing.assert_allclose(total, want_total, rtol=1e-6)
        np.testing.assert_allclose(runtime.state["n"], model.n.numpy())


def test_torch_and_strided_inputs_are_written_too(saved):
    model, runtime, _, _ = saved
    x, total = _inputs(3, 4)
    want, want_x, want_total = _eager(model, x, total)
    torch_x, torch_total = torch.from_numpy(x.copy()), torch.from_numpy(total.copy())
    torch.testing.assert_close(runtime(torch_x, torch_total), torch.from_numpy(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch_x, torch.from_numpy(want_x))
    torch.testing.assert_close(torch_total, torch.from_numpy(want_total))

    want, want_x, _ = _eager(model, x, total)
    wide = np.zeros((4, 8), dtype=np.float32)
    wide[:, ::2] = x
    np.testing.assert_allclose(runtime(wide[:, ::2], total.copy()), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wide[:, ::2], want_x, rtol=1e-6)
    assert not wide[:, 1::2].any()


def test_inputs_that_cannot_take_the_write_are_refused_before_running(saved):
    _, runtime, _, _ = saved
    before = runtime.state["n"].copy()
    x, total = _inputs(4, 3)
    frozen = total.copy()
    frozen.flags.writeable = False
    with pytest.raises(sfx.StructfxError, match=r"total is read-only.*total\.copy\(\)"):
        runtime(x, frozen)
    both = np.zeros((4, 4), dtype=np.float32)
    with pytest.raises(sfx.StructfxError, match="share memory"):
        runtime(both, both[0])
    np.testing.assert_array_equal(runtime.state["n"], before)


WITHOUT_TORCH = textwrap.dedent(
    """
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    from structfx.runtime import load

    runtime = load(sys.argv[1])
    x, total = np.load(sys.argv[2]), np.load(sys.argv[3])
    first = runtime(x, total)
    second = runtime(x, total)
    np.savez(sys.argv[4], first=first, second=second, x=x, total=total, n=runtime.state["n"])
    """
)


def test_the_artifact_writes_its_inputs_and_keeps_its_state_without_torch(saved, tmp_path):
    _, _, path, model = saved  # the model as it was when the artifact was saved
    x, total = _inputs(5, 3)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "total.npy", total)
    subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(path), str(tmp_path / "x.npy"),
                    str(tmp_path / "total.npy"), str(tmp_path / "out.npz")], check=True)
    eager_x, eager_total = torch.from_numpy(x.copy()), torch.from_numpy(total.copy())
    with torch.no_grad():
        first, second = model(eager_x, eager_total).numpy(), model(eager_x, eager_total).numpy()
    with np.load(tmp_path / "out.npz") as got:
        np.testing.assert_allclose(got["first"], first, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["second"], second, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["x"], eager_x.numpy(), rtol=1e-6)
        np.testing.assert_allclose(got["total"], eager_total.numpy(), rtol=1e-6)
        assert float(got["n"]) == float(model.n) == 3.0


def test_inspect_names_the_written_inputs_and_the_state(saved):
    from typer.testing import CliRunner

    from structfx.cli import app

    result = CliRunner().invoke(app, ["inspect", str(saved[2])])
    assert result.exit_code == 0, result.output
    assert "writes: input x in place" in result.output and "writes: input total in place" in result.output
    assert "state: n (updated by every call" in result.output
