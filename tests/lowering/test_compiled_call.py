"""CompiledModel.__call__'s cheap path: inputs like the last accepted ones skip the signature check, anything else is
still checked; outputs share the VM's memory; inputs that need gradients or are not contiguous are taken as values."""

import pytest
import torch
from torch import nn

import structfx as sfx


@pytest.fixture(scope="module")
def model_and_compiled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval()
    return model, sfx.compile(model, torch.randn(4, 16))


def test_a_bad_input_after_a_good_call_is_still_refused(model_and_compiled):
    _, compiled = model_and_compiled
    compiled(torch.randn(3, 16))
    with pytest.raises(sfx.StructfxError, match=r"input got \(3, 15\) float32"):
        compiled(torch.randn(3, 15))
    compiled(torch.randn(3, 16))
    with pytest.raises(sfx.StructfxError, match=r"got \(3, 16\) float64"):
        compiled(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(sfx.StructfxError, match="inputs must be on cpu"):
        compiled(torch.randn(3, 16, device="meta"))
    with pytest.raises(sfx.StructfxError, match=r"expected 1 input\(s\)"):
        compiled(torch.randn(3, 16), torch.randn(3, 16))
    with pytest.raises(sfx.StructfxError, match="is a list"):
        compiled([1.0] * 16)


def test_inputs_needing_gradients_or_not_contiguous_give_the_eager_values(model_and_compiled):
    model, compiled = model_and_compiled
    x = torch.randn(16, 5, requires_grad=True)
    with torch.no_grad():
        want = model(x.t())
    for _ in range(2):  # the second call takes the cheap path
        got = compiled(x.t())
        assert float((got - want).norm() / want.norm()) < 1e-5


def test_each_call_returns_its_own_output(model_and_compiled):
    model, compiled = model_and_compiled
    a, b = torch.randn(2, 16), torch.randn(2, 16)
    first, second = compiled(a), compiled(b)
    with torch.no_grad():
        assert torch.allclose(first, model(a), atol=1e-5) and torch.allclose(second, model(b), atol=1e-5)


def test_calls_from_several_threads_give_each_its_own_result(model_and_compiled, tmp_path):
    """One CompiledModel (and its saved artifact, loaded) called from three threads at mixed batch sizes: each
    call gets the eager values of its own input (the VM runs one call at a time; unguarded, this crashed)."""
    from concurrent.futures import ThreadPoolExecutor

    from structfx.runtime import load

    model, compiled = model_and_compiled
    loaded = load(compiled.save(tmp_path / "artifact"))
    inputs = [torch.randn(batch, 16) for batch in (1, 3, 8, 17) * 10]
    with torch.no_grad():
        wants = [model(x) for x in inputs]
    for run in (compiled, loaded):
        with ThreadPoolExecutor(3) as pool:
            gots = list(pool.map(run, inputs))
        assert all(torch.allclose(got, want, atol=1e-6) for got, want in zip(gots, wants))
