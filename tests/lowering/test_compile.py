"""compile(): every op and real models through TVM, against eager PyTorch."""

import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.nn import BTTLinear, SPMLinear
from tests.cases import CASES
from tests.passes.models import SmallCNN, tiny_bert


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_op_matches_eager_at_any_batch(case):
    module = case.make().float().eval()
    compiled = sfx.compile(module, case.inputs(5).float())
    for batch in (1, 7, 33):
        x = case.inputs(batch, seed=batch).float()
        with torch.no_grad():
            want = module(x)
        assert _relative(compiled(x), want) < 1e-4


PRIMES = [BTTLinear(257, 263, rank=2), SPMLinear(263, 257, pairing="random"), BTTLinear(31, 5)]


@pytest.mark.parametrize("layer", PRIMES, ids=["btt_primes", "spm_primes", "btt_tiny"])
def test_prime_sizes(layer):
    layer = layer.eval()
    x = torch.randn(9, layer.in_features)
    compiled = sfx.compile(layer, x)
    with torch.no_grad():
        assert _relative(compiled(x), layer(x)) < 1e-4


def test_transformed_digits_mlp():
    from structfx.demo import build_models, load_data

    torch.manual_seed(0)
    data = load_data()
    small = sfx.transform(build_models()["dense (ReLU)"], [sfx.BTT(rank=2), sfx.MaxPlus(k=2)],
                          example_inputs=(data.x_test[:8],))
    compiled = sfx.compile(small, data.x_test[:8])
    with torch.no_grad():
        assert _relative(compiled(data.x_test), small(data.x_test)) < 1e-4


def test_transformed_tiny_bert():
    model, inputs = tiny_bert()
    small = sfx.transform(model, [sfx.SPM(fit_steps=0), sfx.MaxPlus(k=2)], example_inputs=inputs)
    compiled = sfx.compile(small, inputs)
    ids = torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        want = small(ids)
    got = compiled(ids)
    assert _relative(got.last_hidden_state, want.last_hidden_state) < 1e-4
    assert _relative(got.pooler_output, want.pooler_output) < 1e-4


def test_small_cnn_with_maxplus_pooling():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    small = sfx.transform(SmallCNN(), [sfx.MaxPlus(min_features=1), sfx.MaxPlusPool(min_features=1)],
                          example_inputs=(x,))
    compiled = sfx.compile(small, x)
    with torch.no_grad():
        assert _relative(compiled(x[:3]), small(x[:3])) < 1e-4


def test_wrong_inputs_are_refused_before_running():
    compiled = sfx.compile(nn.Sequential(BTTLinear(16, 16)).eval(), torch.randn(4, 16))
    expected = r"input got \(4, 15\) float32, expected input: \(batch, 16\) float32"
    with pytest.raises(sfx.StructfxError, match=expected):
        compiled(torch.randn(4, 15))
    with pytest.raises(sfx.StructfxError, match=r"got \(4, 16\) float64.*expected .*float32"):
        compiled(torch.randn(4, 16, dtype=torch.float64))
    with pytest.raises(sfx.StructfxError, match=r"expected 1 input\(s\)"):
        compiled(torch.randn(4, 16), torch.randn(4, 16))


@pytest.mark.parametrize("target, message", [("metal", "not supported"),
                                             ("cuda -arch=sm_90 -bogus=1", "not a TVM target"),
                                             (3, "must be a string")])
def test_bad_targets(target, message):
    with pytest.raises(sfx.StructfxError, match=message):
        sfx.compile(BTTLinear(16, 16), torch.randn(2, 16), target=target)


class VarArgs(nn.Module):
    def forward(self, x, *rest):
        return x * rest[0] - rest[1]


def test_forward_with_star_args_compiles_with_a_symbolic_batch():
    model = VarArgs()
    compiled = sfx.compile(model, tuple(torch.randn(3, 4) for _ in range(3)))
    inputs = tuple(torch.randn(5, 4) for _ in range(3))
    assert torch.allclose(compiled(*inputs), model(*inputs))
