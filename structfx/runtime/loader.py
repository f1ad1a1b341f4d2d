"""Load and run a saved artifact with the TVM runtime and numpy alone (no torch, no structfx compiler)."""

from __future__ import annotations

import platform
import threading
from pathlib import Path

import numpy as np

from structfx.errors import StructfxError, require_path
from structfx.runtime.artifact import KERNELS, WEIGHTS, read_verified_manifest
from structfx.runtime.host import X86_FEATURES, cpu_flags, use_every_core
from structfx.runtime.signature import (
    Mutations,
    TensorSpec,
    check_inputs,
    check_values,
    check_written_alone,
    type_name,
)


class Runtime:
    """A loaded artifact: call it with numpy arrays (or torch tensors, through DLPack); numpy comes back
    (torch tensors for torch inputs). Several outputs come back as a tuple, in the model's output order.
    Calls from several threads are safe and run one at a time.

    In-place updates are carried as in the CompiledModel that was saved: an input the forward writes holds
    its new value after the call (it must be writeable, and not share memory with another input), and the
    buffers it updates are this runtime's own, starting from their values when the artifact was saved."""

    def __init__(self, manifest: dict, vm, params: list, device, state: list) -> None:
        self.manifest, self._vm, self._params, self._device = manifest, vm, params, device
        self._lock = threading.Lock()  # a VM runs one call at a time: calls from several threads queue
        self.inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
        self.outputs = [TensorSpec.from_dict(s) for s in manifest["outputs"]]
        self.mutations = Mutations.from_dict(manifest["mutations"])
        self._state = list(state)  # TVM tensors on the device, in the order of mutations.state

    def __call__(self, *args):
        import tvm

        torch_in = any(type(a).__module__.startswith("torch") for a in args)
        arrays = [_as_numpy(a) for a in args]
        check_inputs(self.inputs, [
            type_name(arg) if a is None else (tuple(a.shape), str(a.dtype)) for arg, a in zip(args, arrays)
        ], "a numpy array or a CPU torch tensor")
        check_values(self.inputs, arrays)
        if self.mutations.inputs:
            self._check_writable(arrays)
        values = [tvm.runtime.tensor(np.ascontiguousarray(a), self._device) for a in arrays]
        use_every_core()  # on the calling thread: TVM's thread pool is per thread
        with self._lock:
            result = self._vm["main"](*values, *self._state, *self._params)
            leaves = [result] if hasattr(result, "numpy") else list(result)
            for slot, (_, position) in enumerate(self.mutations.state):
                self._state[slot] = leaves[position]
        for index, position in self.mutations.inputs:
            np.copyto(arrays[index], leaves[position].numpy())
        outputs = [leaf.numpy() for leaf in self.mutations.user_outputs(leaves)]
        if torch_in:
            import torch

            outputs = [torch.from_numpy(o) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _check_writable(self, arrays: list) -> None:
        """Refuse, before any kernel runs, an input the forward writes that cannot take its new value."""
        for index, _ in self.mutations.inputs:
            if not arrays[index].flags.writeable:
                name = self.inputs[index].name
                raise StructfxError(
                    f"{name} is read-only, and the model's forward writes it in place: pass a writeable array "
                    f"(e.g. {name}.copy()) to receive its new value"
                )
        check_written_alone(self.inputs, self.mutations, arrays, np.shares_memory)

    @property
    def state(self) -> dict:
        """The buffers and parameters the forward updates: name -> numpy array of its current value."""
        return {name: value.numpy() for (name, _), value in zip(self.mutations.state, self._state)}


def load(directory: str | Path, device: str = "cpu") -> Runtime:
    """Check the artifact (manifest digest, format version, sha256 of every file) BEFORE loading its
    native code, check that this machine can run its target, then load it.

    ``directory``: an artifact written by ``CompiledModel.save``. ``device``: ``"cpu"`` for an llvm
    build, ``"cuda"`` (GPU 0) for a cuda build. Needs numpy, safetensors and TVM's runtime library only
    (``TVM_USE_RUNTIME_LIB=1`` or the folder ``python -m structfx.runtime.bundle`` writes): no torch, no
    TVM compiler.

    Returns a ``Runtime``: call it with numpy arrays (or CPU torch tensors) of the shapes and dtypes in
    its ``inputs`` (``None`` in a shape is the batch: any size); it returns numpy arrays (torch tensors
    for torch inputs), a tuple for several outputs. A call with the wrong number, shape or dtype of
    inputs raises StructfxError before any kernel runs.

    Raises StructfxError for a missing, changed or newer-format artifact, a device that does not match
    the build, a CPU without the instruction-set features the build uses, no CUDA GPU, or a GPU whose
    compute capability cannot run the build's CUDA architecture.
    """
    require_path(directory, "load's directory")
    root = Path(directory)
    manifest = read_verified_manifest(root)
    _check_runnable(manifest["target"], device)
    import tvm
    from safetensors.numpy import load_file
    from tvm.runtime.vm import VirtualMachine  # tvm.relax is absent with the runtime alone

    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    weights = load_file(str(root / WEIGHTS))
    params = [tvm.runtime.tensor(weights[name], dev) for name in manifest["params"]]
    state = [tvm.runtime.tensor(weights[name], dev) for name in manifest["state"]]
    vm = VirtualMachine(tvm.runtime.load_module(str(root / KERNELS)), dev)
    return Runtime(manifest, vm, params, dev, state)


def _check_runnable(target: dict, device: str) -> None:
    kind = target.get("kind")
    if device not in ("cpu", "cuda"):
        raise StructfxError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    if (kind == "cuda") != (device == "cuda"):
        wanted = "cuda" if kind == "cuda" else "cpu"
        raise StructfxError(f"this artifact was built for {kind}; load it with device={wanted!r}")
    if kind == "cuda":
        import tvm

        gpu = tvm.cuda(0)
        if not gpu.exist:
            raise StructfxError("this artifact was built for cuda and no CUDA GPU is present on this machine")
        check_cuda_arch(target.get("arch", ""), gpu.compute_version)
        return
    triple = target.get("mtriple", "")
    machine = platform.machine()
    if triple and not triple.startswith(machine):
        raise StructfxError(f"this artifact was built for {triple}; this machine is {machine}")
    disabled = {f.lstrip("-") for f in target.get("mattr", []) if f.startswith("-")}
    if machine == "x86_64" and target.get("mcpu"):
        missing = [f for f in X86_FEATURES if f not in disabled and f not in cpu_flags()]
        if missing:
            raise StructfxError(
                f"this artifact was built for {target['mcpu']} and uses {', '.join(missing)}, which this CPU lacks; "
                f"compile it again on (or for) this machine"
            )


def check_cuda_arch(arch: str, compute_version: str) -> None:
    """Refuse a CUDA build this GPU cannot run. TVM compiles CUDA kernels to machine code for one
    architecture (cubin, no PTX to recompile): code for ``sm_XY`` runs on GPUs of compute capability X.Z
    with Z >= Y (NVIDIA's CUDA Compatibility Guide, "binary compatibility"). ``compute_version`` is the
    device's, e.g. ``"9.0"``; ``arch`` the build's, e.g. ``"sm_90"``."""
    major, minor = (int(part) for part in compute_version.split("."))
    digits = arch.removeprefix("sm_").rstrip("af")
    if not arch.startswith("sm_") or not digits.isdigit() or len(digits) < 2:
        raise StructfxError(f"this artifact's target names no CUDA architecture ({arch!r}); compile it again "
                            f"with target='cuda -arch=sm_{major}{minor}' for this GPU")
    built = (int(digits[:-1]), int(digits[-1]))
    if built[0] != major or built[1] > minor:
        raise StructfxError(
            f"this artifact was built for {arch} and this GPU has compute capability {compute_version}: "
            f"compile it again with target='cuda -arch=sm_{major}{minor}' (or target='cuda' on this machine)"
        )


def _as_numpy(value):
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "__dlpack__"):  # a torch tensor (CPU): no copy
        return np.from_dlpack(value.detach() if hasattr(value, "detach") else value)
    return None
