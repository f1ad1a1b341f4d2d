"""Which coordinates SPM mixes at each stage: fixed structure, never learned.

A stage is a permutation ``perm`` of the N coordinates whose consecutive entries ``(perm[2i], perm[2i+1])``
are one mixed pair (p, q), p < q. Butterfly stage l pairs i with ``i XOR 2^(l mod log2 N)``; "random"
draws a fresh seeded perfect matching per stage.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import torch

from structfx.errors import StructfxError

Pairing = Literal["butterfly", "random"]

#: A random schedule that has not connected every output to every input after this many times
#: log2 N stages is a bug, not bad luck (about 1.5 log2 N are needed).
_MAX_STAGE_FACTOR = 8


def spm_width(in_features: int, out_features: int) -> int:
    """N: the next power of two >= both sizes (and >= 2, so that there is a pair to mix)."""
    return max(2, 1 << (max(in_features, out_features) - 1).bit_length())


def _butterfly_stage(width: int, stage: int) -> np.ndarray:
    stride = 1 << (stage % int(math.log2(width)))
    low = np.arange(width)
    low = low[(low & stride) == 0]
    return np.stack([low, low | stride], axis=1).ravel()


def _random_stages(width: int, stages: int, seed: int) -> list[np.ndarray]:
    generator = torch.Generator().manual_seed(seed)  # torch's generator: the same stages on every platform
    out = []
    for _ in range(stages):
        pairs = torch.randperm(width, generator=generator).view(-1, 2)
        out.append(pairs.sort(dim=1).values.flatten().numpy())
    return out


@functools.lru_cache(maxsize=64)
def stage_permutations(width: int, stages: int, pairing: Pairing, seed: int) -> np.ndarray:
    """(stages, width) int64 array: row l lists stage l's pairs as consecutive (p, q) entries.

    Plain numpy, so that it is a constant (never a traced value) when torch.compile traces a backward.
    """
    if pairing == "butterfly":
        return np.stack([_butterfly_stage(width, stage) for stage in range(stages)])
    if pairing == "random":
        return np.stack(_random_stages(width, stages, seed))
    raise StructfxError(f"SPM pairing={pairing!r} is unknown; use 'butterfly' or 'random'")


def stages_to_connect(perms: np.ndarray) -> int | None:
    """The first stage count after which every output depends on every input (None: never).

    A reachability question, answered by holding the (N, N) relation as packed bits and OR-ing in each
    stage's partner rows: O(N^2 L / 8) bytes of work, where a graph search per node is O(N^2 L) Python steps.
    """
    width = perms.shape[1]
    reach = np.packbits(np.eye(width, dtype=bool), axis=1)
    full = np.packbits(np.ones(width, dtype=bool))
    for stage, perm in enumerate(perms, start=1):
        partner = np.empty(width, dtype=np.int64)
        partner[perm[0::2]], partner[perm[1::2]] = perm[1::2], perm[0::2]
        reach = reach | reach[partner]
        if (reach == full).all():
            return stage
    return None


def default_stages(width: int, pairing: Pairing, seed: int) -> int:
    """The fewest stages that connect every output to every input: log2 N for the butterfly."""
    log_width = int(math.log2(width))
    if pairing == "butterfly":
        return log_width
    most = _MAX_STAGE_FACTOR * log_width
    stages = stages_to_connect(stage_permutations(width, most, pairing, seed))
    if stages is None:
        raise StructfxError(f"random pairing with seed {seed} did not connect N={width} in {most} stages")
    return stages
