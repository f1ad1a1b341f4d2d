"""Small models for the transform tests: transformers models from configs (random weights, no download)
and hand-written ones that exercise every spelling of a candidate layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=100,
        max_position_embeddings=32, hidden_act="relu",
    )
    return BertModel(config).eval(), (torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)),)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32, activation_function="relu",
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval(), (torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)),)


def tiny_resnet():
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    return ResNetModel(config).eval(), (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


class Block(nn.Module):
    """Traceable: every functional spelling of ReLU and a functional linear with a parameter weight."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down_weight = nn.Parameter(torch.randn(width, 2 * width) / (2 * width) ** 0.5)
        self.down_bias = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        h = F.relu(self.up(x))
        h = torch.relu(h) + h.relu()
        return F.linear(h, self.down_weight, self.down_bias).relu_()


class DataDependent(nn.Module):
    """Untraceable at the top (``if x.sum() > 0``), traceable below."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.first = Block(width)
        self.second = Block(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.first(x)
        if x.sum() > 0:
            x = self.second(x)
        return self.head(x)


class SmallCNN(nn.Module):
    """Convolutions with functional and module pools, ReLUs on feature maps, a 4x4 pool (global on 16x16
    inputs; an adaptive pool would be kept, and TVM imports no adaptive max pool) and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.gap = nn.MaxPool2d(4)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.conv2(x)), 3, stride=2, padding=1, ceil_mode=True)
        return self.fc(self.gap(x).flatten(1))
