"""The on-disk artifact: one directory, checked before anything in it is used.

    kernels.so            the compiled Relax VM executable (native code: loading it runs it)
    weights.safetensors   the parameters, in the order and layout the executable takes them (format 3: dense
                          layers' weights packed into GEMM panels at compile time, structfx.lowering.packing),
                          and the values, as of saving, of the buffers the forward updates (format 4)
    manifest.json         format version, versions, target, signature, sha256 of every other file
    manifest.sha256       sha256 of manifest.json

The checksums catch corruption and edits; they are not a signature: anyone who can rewrite the whole
directory can rewrite them too. Load artifacts only from sources you trust.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from structfx.errors import StructfxError

#: 2: no row padding; symbolic dims named in the signature; 3: dense weights stored packed; 4: in-place updates
#: (the manifest's "mutations", the updated buffers' values in the weights as "state")
FORMAT_VERSION = 4
MANIFEST, MANIFEST_DIGEST = "manifest.json", "manifest.sha256"
KERNELS, WEIGHTS = "kernels.so", "weights.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_verified_manifest(directory: str | Path) -> dict:
    """The manifest, after checking its own digest, its format version and every file it lists."""
    root = Path(directory)
    if not (root / MANIFEST).is_file():
        raise StructfxError(f"{root} is not a structfx artifact: {MANIFEST} is missing (make one with compiled.save)")
    digest_path = root / MANIFEST_DIGEST
    if not digest_path.is_file():
        raise StructfxError(f"{digest_path} is missing: the manifest cannot be checked; re-save the artifact")
    if sha256_file(root / MANIFEST) != digest_path.read_text().strip():
        raise StructfxError(f"{root / MANIFEST} was changed after saving (sha256 mismatch); re-save the artifact")
    manifest = json.loads((root / MANIFEST).read_text())
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StructfxError(
            f"{root / MANIFEST} has format version {version}; this structfx reads version {FORMAT_VERSION}: "
            f"load it with the structfx that saved it, or re-save it with this one"
        )
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise StructfxError(f"{path} is missing from the artifact; re-save it")
        if sha256_file(path) != expected:
            raise StructfxError(f"{path} was changed after saving (sha256 mismatch); re-save the artifact")
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    """manifest.json with the sha256 of every file already in ``directory``, and its own digest beside it."""
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": {
        p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.name not in (MANIFEST, MANIFEST_DIGEST)
    }}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (directory / MANIFEST_DIGEST).write_text(sha256_file(directory / MANIFEST) + "\n")
