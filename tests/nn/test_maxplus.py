import pytest
import torch

from structfx import StructfxError
from structfx.measure import peak_allocated_bytes
from structfx.nn import ChannelMaxPlus, SparseMaxPlus
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


def _channel_layer(bias: bool = True) -> ChannelMaxPlus:
    layer = ChannelMaxPlus(5, 7, k=3, bias=bias, init="paper", generator=torch.Generator().manual_seed(0))
    return layer.double()


@pytest.mark.parametrize("bias", [True, False])
def test_channel_op_reads_dim_1_as_the_reference_does(bias):
    """sparse_maxplus(x, ..., dim=1) on (N, C, *spatial), no transposes: the brute-force max over channels."""
    layer = _channel_layer(bias)
    for shape in [(3, 5, 4, 6), (1, 5, 7), (2, 5, 2, 3, 3)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(layer(x), layer.reference(x), rtol=0, atol=0)
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x), layer.reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_channel_op_gradcheck_float64(bias):
    layer = _channel_layer(bias)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [layer.weight] + ([layer.bias] if bias else [])
    assert torch.autograd.gradcheck(
        lambda x, *p: torch.ops.structfx.sparse_maxplus(x, layer.idx, *p, *([] if bias else [None]), 1),
        (x, *params),
    )


def test_channel_op_backward_matches_reference():
    layer = _channel_layer()
    x = torch.randn(3, 5, 4, 2, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 4, 2, dtype=torch.float64)
    got = torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], g)
    want = torch.autograd.grad(layer.reference(x), [x, layer.weight, layer.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channel_relu_init_is_exactly_relu_in_either_memory_format(memory_format):
    layer = ChannelMaxPlus(48, 48, k=2, init="relu", generator=torch.Generator().manual_seed(0))
    x = (torch.randn(2, 48, 5, 7) * 100).to(memory_format=memory_format)
    got, want = layer(x), torch.relu(x)
    assert torch.equal(got, want) and got.stride() == want.stride()
