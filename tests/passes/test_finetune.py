"""A transformed model is a plain nn.Module: fine-tuning it in PyTorch lowers its loss."""

import torch
from torch import nn

import structfx as sfx
from structfx.demo import build_models, load_data, train


def test_fine_tuning_a_transformed_digits_mlp_lowers_its_loss():
    torch.manual_seed(0)
    data = load_data()
    dense = build_models()["dense (ReLU)"]
    train(dense, data, epochs=5)
    small = sfx.transform(dense, [sfx.BTT(rank=1), sfx.MaxPlus(k=2)], example_inputs=(data.x_test[:8],))
    assert len(sfx.report(small).replaced) == 4

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(small(data.x_train), data.y_train))

    before = loss()
    losses = train(small, data, epochs=4, lr=1e-3)
    assert loss() < before and losses[-1] < losses[0]
