import pytest
import torch

from structfx import StructfxError
from structfx.measure import peak_allocated_bytes
from structfx.nn import SparseMaxPlus
from structfx.nn.maxplus import distinct_indices


def test_relu_init_is_exactly_relu():
    layer = SparseMaxPlus(300, 300, k=4, init="relu", generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 300) * 100
    assert torch.equal(layer(x), torch.relu(x))


def test_from_module_converts_relu_only():
    assert SparseMaxPlus.from_module(torch.nn.ReLU(), 8).k == 2
    with pytest.raises(StructfxError, match="converts nn.ReLU"):
        SparseMaxPlus.from_module(torch.nn.GELU(), 8)


def test_indices_are_distinct_per_row():
    idx = distinct_indices(500, 10, 7, torch.Generator().manual_seed(0))
    assert idx.min() >= 0 and idx.max() < 10
    assert all(len(set(row.tolist())) == 7 for row in idx)


def test_ties_go_to_bias_then_lowest_t():
    layer = SparseMaxPlus(2, 1, k=2)
    with torch.no_grad():
        layer.idx.copy_(torch.tensor([[0, 1]]))
        layer.weight.zero_()
        layer.bias.fill_(1.0)
    x = torch.tensor([[1.0, 1.0]], requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad.item() == 1.0 and x.grad.abs().sum() == 0
    layer.bias.data.fill_(0.0)
    layer.zero_grad()
    x.grad = None
    layer(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0]] and layer.weight.grad.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(in_features=4, out_features=4, k=5), "k=5 must be between 1 and in_features=4"),
        (dict(in_features=4, out_features=6, k=2, init="relu"), "in_features == out_features"),
        (dict(in_features=4, out_features=4, k=2, init="xavier"), "init='xavier' is unknown"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(StructfxError, match=message):
        SparseMaxPlus(**kwargs)


def test_wrong_input_width_is_a_clear_error():
    with pytest.raises(StructfxError, match=r"expects inputs \(\.\.\., 8\), got \(2, 9\)"):
        SparseMaxPlus(8, 8)(torch.randn(2, 9))


def test_forward_backward_memory_at_4096():
    """B = 256, n = 4096, k = 2: the paper's broadcast form needs 16 GiB; ours must stay under 64 MiB."""
    torch.manual_seed(0)
    layer = SparseMaxPlus(4096, 4096, k=2)
    x = torch.randn(256, 4096, requires_grad=True)
    peak = peak_allocated_bytes(lambda: layer(x).sum().backward())
    assert 0 < peak < 64 * 2**20, f"forward + backward allocated {peak / 2**20:.1f} MiB at peak"


def test_memory_measure_sees_the_broadcast_form():
    """The same measure on the broadcast reference, at a size it can afford: B n_out n_in floats at least."""
    layer = SparseMaxPlus(512, 512, k=2)
    x = torch.randn(32, 512, requires_grad=True)
    peak = peak_allocated_bytes(lambda: layer.reference(x).sum().backward())
    assert peak >= 32 * 512 * 512 * 4
