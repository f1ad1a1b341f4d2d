"""A compiled model: TVM Relax VM underneath, torch tensors in and out (through DLPack, no copies)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import Tensor

from structfx.errors import StructfxError
from structfx.lowering.compat import Target, relax, tvm
from structfx.runtime.host import use_every_core
from structfx.runtime.signature import Mutations, TensorSpec, check_inputs, check_values, check_written_alone, type_name

#: torch dtypes ``Tensor.numpy()`` takes (not bfloat16 nor the float8 types).
NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                          torch.float32, torch.float64, torch.complex64, torch.complex128})


class CompiledModel:
    """Call it like the model it came from. Inputs are checked against the exported signature
    (structfx.runtime.signature) before any kernel runs; symbolic dims (the batch, a sequence length)
    take any size in their bounds, with no padding. ``save(dir)`` writes a deployable artifact. Calls from
    several threads are safe and run one at a time (the VM keeps one call's state).

    In-place updates are carried as eager PyTorch makes them (structfx.lowering.mutations): an input the
    forward writes (``x.add_(1)``, ``x[0] = v``) holds its new value after the call, and the buffers and
    parameters it updates (a call counter) are the compiled model's own ``state`` (name -> tensor), starting
    from the model's values at compile time and updated by every call; the model itself is left unchanged.
    An input the forward writes that shares memory with another input is refused (StructfxError)."""

    def __init__(self, executable, params: list, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 out_spec, target: Target, kernels: list[str], mutations: Mutations,
                 state: list[Tensor]) -> None:
        self.executable, self.params = executable, params
        self.inputs, self.outputs, self.out_spec, self.target = inputs, outputs, out_spec, target
        self.kernels = kernels  # names of our own scheduled kernels in the build
        self.mutations = mutations
        self.state = {name: value for (name, _), value in zip(mutations.state, state)}
        self.device = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
        self._vm, self._device_params, self._main = None, None, None
        self._shared_device = "cuda" if target.kind.name == "cuda" else "cpu"  # torch tensors there go by DLPack
        self._allowed_devices = {"cpu", "cuda"} if target.kind.name == "cuda" else {"cpu"}
        self._checked = None  # the (shape, dtype, device) of each input of the last call that passed check_inputs
        self._indexes = any(spec.values is not None for spec in inputs)  # token ids: checked on every call
        self._lock = threading.Lock()  # a Relax VM runs one call at a time: calls from several threads queue

    def _machine(self):
        """The Relax VM and the weights on the device, made on first use (a cuda build compiles
        anywhere, runs only with a GPU)."""
        if self._vm is None:
            if not self.device.exist:
                raise StructfxError(
                    f"no {self.target.kind.name} device is present: this model was built for "
                    f"{self.target.kind.name}; compile with target='llvm' to run on the CPU"
                )
            self._vm = relax.VirtualMachine(self.executable, self.device)
            # the build's own copies (structfx.lowering.build): on the CPU they are the weights the VM reads
            self._device_params = self.params if self._shared_device == "cpu" else [
                tvm.runtime.tensor(p.numpy(), self.device) for p in self.params]
            self._main = self._vm["main"]
        return self._vm, self._device_params

    def __call__(self, *args: Tensor, **kwargs):
        if kwargs:
            accepted = ", ".join(spec.name for spec in self.inputs)
            raise StructfxError(
                f"the compiled model takes its tensor inputs positionally ({accepted}), got keyword argument(s) "
                f"{', '.join(kwargs)}: non-tensor arguments are fixed at compile time; pass the tensors in that "
                f"order, or compile a wrapper module whose forward sets the other arguments"
            )
        self.check_inputs(args)
        if self._indexes:
            check_values(self.inputs, args)
        if self.mutations.inputs:
            self._check_writable(args)
        use_every_core()  # on the calling thread: TVM's thread pool is per thread
        with self._lock:
            _, params = self._machine()  # first: it says when the build's device is absent
            state = [self._to_device(value) for value in self.state.values()]
            result = self._main(*[self._to_device(a) for a in args], *state, *params)
            leaves = [result] if isinstance(result, tvm.runtime.Tensor) else [result[i] for i in range(len(result))]
            for name, position in self.mutations.state:
                self.state[name] = self._to_torch(leaves[position])
        with torch.no_grad():
            for index, position in self.mutations.inputs:
                args[index].copy_(self._to_torch(leaves[position]))
        outputs = self.mutations.user_outputs(leaves)
        return torch.utils._pytree.tree_unflatten([self._to_torch(t) for t in outputs], self.out_spec)

    def _check_writable(self, args: tuple) -> None:
        """Refuse, as eager PyTorch would, an input the forward writes that is a leaf needing gradients
        (outside ``torch.no_grad``), and one sharing memory with another input (structfx.runtime.signature)."""
        for index, _ in self.mutations.inputs:
            if args[index].requires_grad and args[index].is_leaf and torch.is_grad_enabled():
                name = self.inputs[index].name
                raise StructfxError(
                    f"{name} is a leaf tensor that requires grad, and the model's forward writes it in place, which "
                    f"eager PyTorch refuses too: call the model under torch.no_grad(), or pass {name}.detach()"
                )
        check_written_alone(self.inputs, self.mutations, args, _shares_memory)

    def _to_torch(self, tensor) -> Tensor:
        """A VM output as a torch tensor sharing its memory. On the CPU through its DLPack capsule: 4x cheaper
        than ``torch.from_dlpack(tensor)``'s protocol negotiation, and there is no stream to synchronise."""
        return torch.from_dlpack(tensor.__dlpack__() if self._shared_device == "cpu" else tensor)

    def _to_device(self, tensor: Tensor):
        """The tensor as a TVM array on the build's device: shared through DLPack where it already is."""
        if tensor.requires_grad:
            tensor = tensor.detach()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        if tensor.is_cuda if self._shared_device == "cuda" else tensor.is_cpu:
            return tvm.runtime.from_dlpack(tensor)
        return tvm.runtime.tensor(tensor.numpy(), self.device)

    def check_inputs(self, args: tuple) -> None:
        """Raises StructfxError for inputs the build does not take (structfx.runtime.signature.check_inputs).
        Inputs of the same shapes, dtypes and devices as the last call that passed are not checked again."""
        key = tuple((a.shape, a.dtype, a.is_cpu, a.is_cuda) for a in args) if all(
            isinstance(a, Tensor) for a in args) else None
        if key is not None and key == self._checked:
            return
        allowed = self._allowed_devices
        if any(isinstance(a, Tensor) and a.device.type not in allowed for a in args):
            devices = " or ".join(sorted(allowed))
            raise StructfxError(f"inputs must be on {devices} for this {self.target.kind.name} build")
        check_inputs(self.inputs, [
            (tuple(a.shape), str(a.dtype).removeprefix("torch.")) if isinstance(a, Tensor) else type_name(a)
            for a in args
        ], "a torch tensor (or use structfx.runtime.load for numpy arrays)")
        self._checked = key

    def device_source(self) -> str:
        """The generated device code of a cuda build (CUDA C), to see what the schedules produced."""
        pending = [self.executable.mod]
        while pending:
            module = pending.pop()
            if module.kind == "cuda":
                return module.inspect_source()
            pending.extend(module.imports)
        raise StructfxError(f"this is a {self.target.kind.name} build: only cuda builds carry device source")

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """One directory: kernels (.so), weights (safetensors), manifest.json (see structfx.runtime)."""
        from structfx.lowering.save import save_artifact

        return save_artifact(self, directory, overwrite)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` have an element in common: exact for CPU tensors of numpy's dtypes (its
    bounded Diophantine solver, ``np.shares_memory``), by their byte ranges otherwise (views of one tensor
    whose ranges interleave count as sharing)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.is_cpu and b.is_cpu and a.dtype in NUMPY_DTYPES and b.dtype in NUMPY_DTYPES:
        import numpy as np

        return bool(np.shares_memory(a.detach().numpy(), b.detach().numpy()))
    return a.device == b.device and a.data_ptr() < _end(b) and b.data_ptr() < _end(a)


def _end(tensor: Tensor) -> int:
    """One past the last byte of ``tensor``'s elements (torch strides are never negative)."""
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr() + (last + 1) * tensor.element_size()
