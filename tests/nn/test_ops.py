"""Every op in the catalogue against its reference (dense matrix or brute force), forward and backward."""

import pytest
import torch

from tests.cases import CASES


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("batch", [1, 5, 0])
def test_forward_matches_reference(case, batch):
    module = case.make()
    x = case.inputs(batch)
    torch.testing.assert_close(module(x), case.reference(module, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if len(c.sample_shape) == 1], ids=lambda c: c.name)
def test_extra_leading_dims(case):
    module = case.make()
    x = case.inputs(6).view(2, 3, *case.sample_shape)
    torch.testing.assert_close(module(x), case.reference(module, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradcheck_float64(case):
    """Inputs and every parameter; continuous random inputs have no max-plus ties."""
    module = case.make()
    names, params = zip(*module.named_parameters())
    x = case.inputs(3).requires_grad_()

    def run(x, *values):
        return torch.func.functional_call(module, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(run, (x, *[p.detach().requires_grad_() for p in params]))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_backward_matches_reference(case):
    """The custom backward agrees with autograd through the reference at float32 too."""
    module = case.make().float()
    x = case.inputs(4).float().requires_grad_()
    grads = torch.autograd.grad(module(x).square().sum(), [x, *module.parameters()])
    expected = torch.autograd.grad(case.reference(module, x).square().sum(), [x, *module.parameters()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
