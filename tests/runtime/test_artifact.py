"""Save -> load in a process where torch cannot be imported -> the same outputs; tampering refused."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import structfx as sfx
from structfx.runtime import load
from tests.passes.models import tiny_bert

TORCH_FREE_RUN = textwrap.dedent(
    """
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            parts = name.split(".")
            compiler = [["structfx", "lowering"], ["structfx", "passes"], ["structfx", "nn"]]
            if parts[0] == "torch" or parts[:2] in compiler:
                raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    from structfx.runtime import load

    runtime = load(sys.argv[1])
    inputs = [np.load(path) for path in sys.argv[3:]]
    outputs = runtime(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    np.savez(sys.argv[2], *outputs)
    """
)


def _run_without_torch(tmp_path, artifact, inputs: list[np.ndarray]) -> list[np.ndarray]:
    paths = []
    for i, array in enumerate(inputs):
        paths.append(tmp_path / f"in{i}.npy")
        np.save(paths[-1], array)
    result = tmp_path / "out.npz"
    subprocess.run([sys.executable, "-c", TORCH_FREE_RUN, str(artifact), str(result), *map(str, paths)], check=True)
    with np.load(result) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


@pytest.fixture(scope="module")
def digits_artifact(tmp_path_factory):
    from structfx.demo import build_models, load_data

    torch.manual_seed(0)
    data = load_data()
    small = sfx.transform(build_models()["dense (ReLU)"], [sfx.BTT(rank=2), sfx.MaxPlus(k=2)],
                          example_inputs=(data.x_test[:8],))
    compiled = sfx.compile(small, data.x_test[:8])
    return compiled, compiled.save(tmp_path_factory.mktemp("digits") / "digits.sfx"), data.x_test[:37]


def test_digits_round_trip_without_torch_is_bitwise(digits_artifact, tmp_path):
    compiled, artifact, x = digits_artifact
    (got,) = _run_without_torch(tmp_path, artifact, [x.numpy()])
    assert np.array_equal(got, compiled(x).numpy())


def test_tiny_bert_round_trip_without_torch_is_bitwise(tmp_path):
    model, (ids,) = tiny_bert()
    small = sfx.transform(model, [sfx.BTT(rank=2), sfx.MaxPlus()], example_inputs=(ids,))
    compiled = sfx.compile(small, ids)
    artifact = compiled.save(tmp_path / "bert.sfx")
    hidden, pooled = _run_without_torch(tmp_path, artifact, [ids.numpy()])
    want = compiled(ids)
    assert np.array_equal(hidden, want.last_hidden_state.numpy())
    assert np.array_equal(pooled, want.pooler_output.numpy())


def test_runtime_takes_torch_tensors_through_dlpack(digits_artifact):
    compiled, artifact, x = digits_artifact
    got = load(artifact)(x)
    assert isinstance(got, torch.Tensor) and torch.equal(got, compiled(x))


def _copy(artifact, tmp_path):
    import shutil

    return shutil.copytree(artifact, tmp_path / "copy.sfx")


@pytest.mark.parametrize("name", ["weights.safetensors", "kernels.so", "manifest.json"])
def test_a_flipped_byte_is_refused_before_loading(digits_artifact, tmp_path, name):
    copy = _copy(digits_artifact[1], tmp_path)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / name).write_bytes(data)
    with pytest.raises(sfx.StructfxError, match=rf"{name} was changed after saving"):
        load(copy)


@pytest.mark.parametrize("name", ["weights.safetensors", "kernels.so", "manifest.sha256"])
def test_a_deleted_file_is_refused(digits_artifact, tmp_path, name):
    copy = _copy(digits_artifact[1], tmp_path)
    (copy / name).unlink()
    with pytest.raises(sfx.StructfxError, match=rf"{name} is missing"):
        load(copy)


@pytest.mark.parametrize("version", [99, 2], ids=["newer", "older_unpacked_weights"])
def test_another_format_is_refused(digits_artifact, tmp_path, version):
    from structfx.runtime.artifact import FORMAT_VERSION, MANIFEST, MANIFEST_DIGEST, sha256_file

    copy = _copy(digits_artifact[1], tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["format_version"] = version
    (copy / MANIFEST).write_text(json.dumps(manifest))
    (copy / MANIFEST_DIGEST).write_text(sha256_file(copy / MANIFEST))
    refusal = f"format version {version}; this structfx reads version {FORMAT_VERSION}"
    with pytest.raises(sfx.StructfxError, match=refusal):
        load(copy)


def test_tampering_is_caught_before_native_code_runs(digits_artifact, tmp_path, monkeypatch):
    import tvm

    copy = _copy(digits_artifact[1], tmp_path)
    (copy / "kernels.so").write_bytes(b"not a library")
    loaded = []
    monkeypatch.setattr(tvm.runtime, "load_module", lambda *a, **k: loaded.append(a))
    with pytest.raises(sfx.StructfxError):
        load(copy)
    assert loaded == []


def test_save_refuses_to_overwrite_and_leaves_nothing_half_written(digits_artifact, tmp_path):
    compiled, _, x = digits_artifact
    target = tmp_path / "model.sfx"
    target.mkdir()
    (target / "mine.txt").write_text("user data")
    with pytest.raises(sfx.StructfxError, match="exists and is not empty"):
        compiled.save(target)
    assert (target / "mine.txt").read_text() == "user data"
    compiled.save(target, overwrite=True)
    assert not (target / "mine.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.sfx"]  # no staging directory left behind


def test_wrong_input_shape_at_run_time(digits_artifact):
    with pytest.raises(sfx.StructfxError, match=r"got \(3, 63\) float32, expected input: \(batch, 64\) float32"):
        load(digits_artifact[1])(np.zeros((3, 63), np.float32))


def test_an_input_that_is_not_an_array_names_what_to_pass(digits_artifact):
    with pytest.raises(sfx.StructfxError, match=r"input is a list: pass a numpy array or a CPU torch tensor \(input: "
                                                r"\(batch, 64\) float32\)"):
        load(digits_artifact[1])([[0.0] * 64])


def test_load_refuses_a_path_of_the_wrong_kind():
    with pytest.raises(sfx.StructfxError, match="load's directory must be a directory path .* got int"):
        load(5)


def test_weights_changed_after_compile_change_neither_the_compiled_model_nor_its_artifact(tmp_path):
    # the compiled model keeps the weights it was compiled with; save wrote the live LayerNorm weight
    # beside the compile-time packed Linear weight: an artifact matching neither model
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)).eval()
    x = torch.randn(4, 16)
    compiled = sfx.compile(model, x)
    with torch.no_grad():
        want = model(x)
        for p in model.parameters():
            p.mul_(3.0).add_(0.5)
    compiled.save(tmp_path / "m.sfx")
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(load(tmp_path / "m.sfx")(x.numpy()), compiled(x).numpy())
