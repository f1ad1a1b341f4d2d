"""Writing a compiled model as an artifact directory (the format: structfx/runtime/artifact.py)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.numpy import save_file

from structfx.errors import StructfxError, require_path
from structfx.lowering.compat import tvm
from structfx.runtime.artifact import KERNELS, WEIGHTS, write_manifest


def save_artifact(compiled, directory: str | Path, overwrite: bool = False) -> Path:
    """Write into a temporary directory beside ``directory`` and rename it into place: an interrupted
    save leaves no half artifact, and an existing directory is replaced only with ``overwrite=True``."""
    require_path(directory, "save's directory")
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise StructfxError(f"{target} exists and is not empty; choose another path or pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        compiled.executable.export_library(str(staging / KERNELS))
        names = [f"p{i}" for i in range(len(compiled.params))]
        state = [f"s{i}" for i in range(len(compiled.state))]
        weights = {name: p.numpy() for name, p in zip(names, compiled.params)}
        weights.update({key: value.cpu().numpy() for key, value in zip(state, compiled.state.values())})
        save_file(weights, str(staging / WEIGHTS))
        write_manifest(staging, {
            "structfx_version": _structfx_version(),
            "tvm_version": tvm.__version__,
            "target": _target_dict(compiled.target),
            "inputs": [s.to_dict() for s in compiled.inputs],
            "outputs": [s.to_dict() for s in compiled.outputs],
            "params": names,
            "state": state,
            "mutations": compiled.mutations.to_dict(),
            "kernels": compiled.kernels,
        })
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _target_dict(target) -> dict:
    return json.loads(str(target))  # a Target prints as its JSON config


def _structfx_version() -> str:
    from structfx import __version__

    return __version__
