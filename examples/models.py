"""Model builders for the command line: ``structfx compile examples/models.py:mlp --rules ... --out DIR``.

Each returns ``(model, example_inputs)``.
"""

import torch
from torch import nn


def mlp():
    """A small MLP on 64 features (the digits images' size)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return model.eval(), (torch.randn(8, 64),)


def bert():
    """A tiny transformers BertModel from a config (random weights, no download)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                        vocab_size=1000, max_position_embeddings=64)
    return BertModel(config).eval(), (torch.randint(0, 1000, (4, 32)),)
