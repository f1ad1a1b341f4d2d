"""Kind 8: nothing that varies between calls is frozen from the example call. A traced part keeps numbers
(cache lengths, offsets) as inputs, so a transformed OPT generates with its cache as the original does."""

import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx
from structfx.nn import BTTLinear, SparseMaxPlus
from tests.passes.field.field_b import transformed


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=2, vocab_size=100,
        max_position_embeddings=64, word_embed_proj_dim=64,
    )
    prompt = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    return OPTForCausalLM(config).eval(), prompt


def test_transformed_opt_generates_the_same_greedy_tokens_with_the_cache():
    model, prompt = _tiny_opt()
    result = transformed(model, [sfx.BTT(rank=64), sfx.MaxPlus(k=2)], (prompt,))
    assert any(isinstance(m, BTTLinear) for m in result.modules())
    assert any(isinstance(m, SparseMaxPlus) for m in result.modules())
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        got = result.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        assert torch.equal(got, want)
        longer = torch.cat([prompt, prompt[:, :3]], dim=1)  # the next call's positions start elsewhere
        step = result(longer[:, -1:], past_key_values=result(longer[:, :-1], use_cache=True).past_key_values)
        reference = model(longer[:, -1:], past_key_values=model(longer[:, :-1], use_cache=True).past_key_values)
        assert torch.allclose(step.logits, reference.logits, atol=1e-5)


class Window(nn.Module):
    """Reads its input from ``offset`` on: the offset changes from call to call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x, offset: int):
        return F.relu(self.fc(x[:, offset:]))


class Stream(nn.Module):
    """Untraceable at the top, so that ``window`` is traced on its own with the example's offset."""

    def __init__(self) -> None:
        super().__init__()
        self.window = Window()

    def forward(self, x, offset: int = 0):
        if x.sum() > 0:
            x = x * 2
        return self.window(x, offset)


def test_a_number_argument_is_not_frozen_to_its_example_value():
    model = Stream()
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0))
    result = transformed(model, [sfx.BTT(rank=64), sfx.MaxPlus(k=2)], (x, 0))
    assert any(isinstance(m, BTTLinear) for m in result.window.modules())
    with torch.no_grad():
        for offset in (0, 2, 5):
            got, want = result(x, offset), model(x, offset)
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-5)
