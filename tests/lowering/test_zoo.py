"""The models people use compile: each zoo model (tests/lowering/zoo.py), as it is and transformed with
[BTT(rank=2), MaxPlus(k=2)], matches eager at two batch sizes and two sequence lengths; the original is then
saved and run by the torch-free runtime in a process that cannot import torch, and matches again."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import structfx as sfx
from tests.lowering.zoo import ZOO, ZooModel

BATCHES = (1, 3)
TOLERANCE = 1e-4

RUN_WITHOUT_TORCH = textwrap.dedent(
    """
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            parts = name.split(".")
            if parts[0] in ("torch", "transformers") or parts[:2] in (["structfx", "lowering"], ["structfx", "nn"],
                                                                      ["structfx", "passes"]):
                raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    from structfx.runtime import load

    runtime = load(sys.argv[1])
    for path in sys.argv[2:]:
        with np.load(path) as saved:
            inputs = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        outputs = runtime(*inputs)
        np.savez(path.replace(".npz", ".out.npz"), *(outputs if isinstance(outputs, tuple) else (outputs,)))
    """
)


def _relative(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


def _leaves(output) -> list[np.ndarray]:
    return [leaf.detach().numpy() for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _cases(entry: ZooModel) -> list[tuple]:
    """(batch, length) for two batch sizes at two lengths (one length where the input size is fixed)."""
    return [(batch, length) for batch in BATCHES for length in (entry.lengths or (0,))]


#: Models whose transformed form repeats another's layers (Llama's for Qwen2 and Mistral, BERT's for
#: DistilBERT): compiled as they are only, to keep the suite short.
SAME_LAYERS_TRANSFORMED = {"qwen2", "mistral", "distilbert"}
CASES = [(entry, transformed) for entry in ZOO for transformed in (False, True)
         if not (transformed and entry.name in SAME_LAYERS_TRANSFORMED)]


@pytest.mark.parametrize("entry, transformed", CASES,
                         ids=[f"{e.name}-{'transformed' if t else 'original'}" for e, t in CASES])
def test_zoo_model_compiles_matches_eager_and_runs_without_torch(entry: ZooModel, transformed: bool, tmp_path):
    model = entry.build()
    example = entry.inputs(2, entry.lengths[0] if entry.lengths else 0)
    if transformed:
        model = sfx.transform(model, [sfx.BTT(rank=2), sfx.MaxPlus(k=2)], example_inputs=example).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compiling")  # no dim of the zoo may become static
        compiled = sfx.compile(model, example)

    wanted, paths = [], []
    for i, (batch, length) in enumerate(_cases(entry)):
        inputs = entry.inputs(batch, length)
        with torch.no_grad():
            want = _leaves(model(*inputs))
        got = _leaves(compiled(*inputs))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert _relative(g, w) < TOLERANCE, f"batch {batch}, length {length}"
        wanted.append(want)
        paths.append(tmp_path / f"in{i}.npz")
        np.savez(paths[-1], *[x.numpy() for x in inputs])

    if transformed:
        return  # our kernels in the torch-free runtime: tests/runtime/test_runtime_only.py
    artifact = compiled.save(tmp_path / f"{entry.name}.sfx")
    subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, str(artifact), *map(str, paths)], check=True)
    for path, want in zip(paths, wanted):
        with np.load(str(path).replace(".npz", ".out.npz")) as saved:
            got = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert _relative(g, w) < TOLERANCE
