"""Small models rebuilt from public bug reports about FX rewriting (issue #15, kinds 1-6): each one is a
way a rewrite can go wrong on real model code. Every class documents the fault it provokes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

W = 64  # wide enough for every rule's default min_features


class InplaceModuleStatement(nn.Module):
    """Kind 1: ``self.act(h)`` with ``nn.ReLU(inplace=True)`` as a statement; ``h`` is read afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(W, W), nn.ReLU(inplace=True), nn.Linear(W, W)

    def forward(self, x):
        h = self.fc(x)
        self.act(h)
        return self.out(h)


class InplaceMethodStatement(nn.Module):
    """Kind 1: ``h.relu_()`` as a statement."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x):
        h = self.fc(x)
        h.relu_()
        return self.out(h)


class InplaceThroughView(nn.Module):
    """Kind 1: ``torch.relu_`` on a view of ``h``, then ``h`` is read: x is (2, 4, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x):
        h = self.fc(x)
        v = h.view(8, W)
        torch.relu_(v)
        return self.out(h)


class InplaceOnTheInput(nn.Module):
    """Kind 1 and 6: an in-place ReLU on the caller's tensor (the original changes it; so must the copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(W, W)

    def forward(self, x):
        F.relu(x, inplace=True)
        return self.fc(x)


class InplaceUnderUntraceableParent(nn.Module):
    """Kind 1 in the module-swap fallback: an in-place ReLU statement where symbolic tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(W, W), nn.ReLU(inplace=True), nn.Linear(W, W)

    def forward(self, x):
        h = self.fc(x)
        self.act(h)
        if h.sum() > 0:
            h = h * 2
        return self.out(h)


class OwnForwardLinear(nn.Linear):
    """Kind 2: a Linear subclass whose forward is not a Linear's."""

    def forward(self, x):
        return super().forward(x) * 2 + 1


class SubclassedLayers(nn.Module):
    """Kind 2: under an untraceable parent, a layer whose class has its own forward is not swapped as a
    plain layer (its forward is traced instead, and proven)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.out = OwnForwardLinear(W, W), nn.ReLU(), nn.Linear(W, W)

    def forward(self, x):
        h = self.act(self.fc(x))
        if h.sum() > 0:
            h = h - 1
        return self.out(h)


class ReadsChildAttributes(nn.Module):
    """Kind 2 (MobileNetV2, Whisper, TransformerEncoderLayer): an untraceable parent reads its children's
    attributes (``stride``, ``eps``, ``weight``) and calls ``F.linear`` on a Linear it never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, W, 3, padding=1), nn.LayerNorm(W)
        self.proj = nn.Linear(W, W)  # never called as a module: only its weight is used

    def forward(self, x):
        h = self.conv(x)
        if self.conv.stride[0] == 1 and h.sum() > 0:
            h = h * 2
        h = F.layer_norm(h.mean((2, 3)), (W,), self.norm.weight, self.norm.bias, self.norm.eps)
        return F.linear(torch.relu(h), self.proj.weight, self.proj.bias)


class SharedReluTwoWidths(nn.Module):
    """Kind 3: one nn.ReLU called at two widths under an untraceable parent."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(W, 2 * W), nn.Linear(2 * W, W), nn.ReLU()

    def forward(self, x):
        h = self.act(self.a(x))
        if h.sum() > 0:
            h = h + 1
        return self.act(self.b(h))


class LinearCalledTwice(nn.Module):
    """Kind 3: one Linear at two call sites (traced): one replacement, shared."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(W, W), nn.ReLU()

    def forward(self, x):
        return self.fc(self.act(self.fc(x)))


class TiedHead(nn.Module):
    """Kind 3: an lm_head whose weight is the embedding's."""

    def __init__(self, vocab: int = 80) -> None:
        super().__init__()
        self.embed, self.mix, self.lm_head = nn.Embedding(vocab, W), nn.Linear(W, W), nn.Linear(W, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.mix(self.embed(ids))))


class FunctionalTiedHead(nn.Module):
    """Kind 3: ``F.linear(h, self.embed.weight)``: the embedding's weight used as a head."""

    def __init__(self, vocab: int = 80) -> None:
        super().__init__()
        self.embed, self.mix = nn.Embedding(vocab, W), nn.Linear(W, W)

    def forward(self, ids):
        return F.linear(torch.relu(self.mix(self.embed(ids))), self.embed.weight)


class ReluAfterConv1d(nn.Module):
    """Kind 4: a ReLU on a Conv1d's (N, C, L): its channels are dim 1, not the last dim L."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.head = nn.Conv1d(8, W, 3, padding=1), nn.ReLU(), nn.Conv1d(W, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.conv(x)))


class ReluChannelsLast(nn.Module):
    """Kind 4: a conv map permuted to (N, H, W, C), then a ReLU: its channels are the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, W, 3, padding=1), nn.Linear(W, 8)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x).permute(0, 2, 3, 1)))


class ConvReluConv(nn.Module):
    """Kind 4: what follows the ReLU (a conv) must see the same tensor, down to its memory format."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, W, 3, padding=1), nn.ReLU(), nn.Conv2d(W, W, 3), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(W, 8, 1))

    def forward(self, x):
        return self.body(x)


class AdaptiveMaxHead(nn.Module):
    """Kind 5: AdaptiveMaxPool2d(1) sees every input size; a fixed window is right at one size only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gap, self.fc = nn.Conv2d(3, W, 3, padding=1), nn.AdaptiveMaxPool2d(1), nn.Linear(W, 10)

    def forward(self, x):
        return self.fc(self.gap(F.relu(self.conv(x))).flatten(1))


class DefaultStridePools(nn.Module):
    """Kind 5: ``F.avg_pool2d(x, 2)`` and ``F.max_pool2d(x, 3)`` with the stride left to its default."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, W, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return F.max_pool2d(h, 3) + F.avg_pool2d(h, 3)


class TrainingBatchNorm(nn.Module):
    """Kind 6: a model in training mode: transform must not update its BatchNorm statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, W, 3, padding=1), nn.BatchNorm2d(W), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(W * 16, W), nn.BatchNorm1d(W), nn.ReLU(), nn.Linear(W, 10))

    def forward(self, x):
        return self.body(x)


class MutatesStateAndInputs(nn.Module):
    """Kind 6: a forward that counts its calls in buffers (in place, and by assignment) and scales its input
    in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(W, W), nn.Linear(W, W)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("total", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        self.total = self.total + x.sum()  # a new tensor assigned to the buffer
        x.mul_(0.5)
        return self.out(torch.relu(self.fc(x)))


class FunctionalReluBranches(nn.Module):
    """Kind 13, the quoted case: three functional ReLUs in a forward that cannot be traced whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x):
        x = F.relu(self.a(x))
        if x.sum() > 0:
            x = torch.relu(self.b(x))
        return x.relu()


class FunctionalReluSuper(nn.Linear):
    """Kind 13 with ``super()`` and an in-place ReLU through a view in the untraceable forward."""

    def forward(self, x):
        h = super().forward(x)
        torch.relu_(h.view(4, -1))
        if h.mean() > 1:
            h = h / 2
        return F.relu(h - 0.1, inplace=False)
