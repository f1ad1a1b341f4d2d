"""An artifact runs with TVM's runtime library alone: no torch, no libtvm_compiler.so in the process.

Two deployments are checked, each in a fresh process where torch cannot be imported: the full apache-tvm
wheel with ``TVM_USE_RUNTIME_LIB=1``, and the folder ``structfx.runtime.bundle`` writes (which has no
compiler library at all). The child reports the shared libraries mapped into it (/proc/self/maps).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.runtime.bundle import write_runtime_bundle
from structfx.runtime.loader import check_cuda_arch

CHILD = textwrap.dedent(
    """
    import json, sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    import tvm
    from structfx.runtime import load

    out = load(sys.argv[1])(np.load(sys.argv[2]))
    np.save(sys.argv[3], out)
    maps = [line.split()[-1] for line in open("/proc/self/maps") if ".so" in line]
    print(json.dumps({
        "libraries": sorted({m for m in maps if "tvm" in m}),
        "has_relax": hasattr(tvm, "relax"),
        "tvm": tvm.__file__,
        "torch_loaded": any(m.split(".")[0] == "torch" for m in sys.modules),
    }))
    """
)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(sfx.BTTLinear(48, 32, rank=2), sfx.SparseMaxPlus(32, 16, k=2), nn.Linear(16, 5)).eval()
    x = torch.randn(7, 48)
    compiled = sfx.compile(model, x)
    return compiled, compiled.save(tmp_path_factory.mktemp("art") / "model.sfx"), x


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle") / "site"
    write_runtime_bundle(root)
    return root


def _run_child(tmp_path, artifact, x, pythonpath):
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(pythonpath)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(artifact), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return np.load(tmp_path / "y.npy"), json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("deployment", ["wheel", "bundle"])
def test_runtime_library_alone_runs_the_artifact_bitwise(artifact, bundle, tmp_path, deployment):
    compiled, path, x = artifact
    repo = os.path.dirname(os.path.dirname(sfx.__file__))
    got, child = _run_child(tmp_path, path, x.numpy(), repo if deployment == "wheel" else bundle)
    assert np.array_equal(got, compiled(x).numpy())
    names = {os.path.basename(p) for p in child["libraries"]}
    assert "libtvm_runtime.so" in names and "libtvm_compiler.so" not in names, child["libraries"]
    assert not child["has_relax"] and not child["torch_loaded"]
    if deployment == "bundle":
        assert child["tvm"].startswith(str(bundle))
        assert all(p.startswith(str(bundle)) for p in child["libraries"]), child["libraries"]


def test_the_bundle_has_no_compiler_and_stays_small(bundle):
    files = [p for p in bundle.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name == "libtvm_compiler.so" or p.parent.name == "relax"]
    assert sum(p.stat().st_size for p in files) < 32 * 2**20


@pytest.mark.parametrize("arch, device, fits", [
    ("sm_90", "9.0", True), ("sm_80", "8.6", True), ("sm_86", "8.0", False), ("sm_80", "9.0", False),
    ("sm_90a", "9.0", True), ("sm_120", "12.0", True),
])
def test_cuda_arch_against_the_gpus_compute_capability(arch, device, fits):
    if fits:
        check_cuda_arch(arch, device)
    else:
        with pytest.raises(sfx.StructfxError, match=rf"built for {arch} and this GPU has compute capability {device}"):
            check_cuda_arch(arch, device)


def test_a_cuda_artifact_without_an_arch_is_refused():
    with pytest.raises(sfx.StructfxError, match="names no CUDA architecture.*sm_90"):
        check_cuda_arch("", "9.0")
