"""Kind 12: results depend on the rules' seed, not on torch's global random state, and transform leaves
that state as it found it."""

import torch
from torch import nn

import structfx as sfx
from structfx.nn import SparseMaxPlus
from tests.passes.field.field_b import MLP, transformed

RULES = [sfx.BTT(rank=2, init="random", min_features=8), sfx.MaxPlus(k=3, init="paper", min_features=8)]


def _run(rules, global_seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MLP(16)
    torch.manual_seed(global_seed)
    return transformed(model, rules, (torch.randn(4, 16, generator=torch.Generator().manual_seed(0)),)).state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_global_seed_does_not_change_the_result():
    assert _same(_run(RULES, 1), _run(RULES, 2))
    spm = [sfx.SPM(fit_steps=20, pairing="random", min_features=8, progress=False)]
    assert _same(_run(spm, 1), _run(spm, 2))


def test_the_rule_seed_does():
    reseeded = [sfx.BTT(rank=2, init="random", min_features=8, seed=1),
                sfx.MaxPlus(k=3, init="paper", min_features=8, seed=1)]
    first, second = _run(RULES, 0), _run(reseeded, 0)
    indices = [k for k in first if k.endswith("idx")]
    assert indices and not all(torch.equal(first[k], second[k]) for k in indices)


class Noisy(nn.Module):
    """Draws from the global generator in its forward (a no-op noise), in training mode with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.act(self.fc(x))) + 0 * torch.rand_like(x)


def test_transform_leaves_the_global_random_state_as_it_was():
    model, x = Noisy().train(), torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    result = transformed(model, [sfx.MaxPlus(k=2, init="paper"), sfx.SPM(fit_steps=5, progress=False)], (x,))
    assert torch.equal(torch.get_rng_state(), before)
    assert any(isinstance(m, SparseMaxPlus) for m in result.modules())
