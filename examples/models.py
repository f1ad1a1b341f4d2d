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

