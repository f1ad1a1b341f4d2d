"""A compiled model: TVM Relax VM underneath, torch tensors in and out (through DLPack, no copies)."""

from __future__ import annotations

import torch
from torch import Tensor

from structfx.errors import StructfxError
from structfx.lowering.compat import Target, relax, tvm
from structfx.lowering.export import TensorSpec, pad_rows


class CompiledModel:
    """Call it like the model it came from. Inputs are checked against the exported signature before
    any kernel runs; a symbolic batch accepts any batch size."""

    def __init__(self, executable, params: list, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 out_spec, target: Target, row_multiple: int | None) -> None:
        self.executable, self.params = executable, params
        self.inputs, self.outputs, self.out_spec, self.target = inputs, outputs, out_spec, target
        self.row_multiple = row_multiple  # None: static batch
        self.device = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
        self._vm = None

    @property
    def vm(self):
        """The Relax VM, made on first use (a cuda build compiles without a GPU, runs only with one)."""
        if self._vm is None:
            if not self.device.exist:
                raise StructfxError(
                    f"no {self.target.kind.name} device is present: this model was built for {self.target.kind.name}; "
                    f"compile with target='llvm' to run on the CPU"
                )
            self._vm = relax.VirtualMachine(self.executable, self.device)
            self.params = [tvm.runtime.tensor(p.numpy(), self.device) for p in self.params]
        return self._vm

    def __call__(self, *args: Tensor):
        self.check_inputs(args)
        vm = self.vm
        batch = args[0].shape[0] if args and args[0].dim() > 0 else None
        if self.row_multiple is not None:
            args = pad_rows(args, self.row_multiple)
        values = [tvm.runtime.from_dlpack(a.detach().contiguous()) for a in args]
        if self.row_multiple is not None:
            values.append(tvm.runtime.ShapeTuple([args[0].shape[0] // self.row_multiple]))
        result = vm["main"](*values, *self.params)
        leaves = [torch.from_dlpack(t) for t in ([result] if hasattr(result, "__dlpack__") else list(result))]
        leaves = [
            leaf[:batch] if spec.shape and spec.shape[0] is None else leaf for leaf, spec in zip(leaves, self.outputs)
        ]
        return torch.utils._pytree.tree_unflatten(leaves, self.out_spec)

    def check_inputs(self, args: tuple) -> None:
        expected = "; ".join(s.describe() for s in self.inputs)
        if len(args) != len(self.inputs):
            raise StructfxError(f"expected {len(self.inputs)} input(s) ({expected}), got {len(args)}")
        for value, spec in zip(args, self.inputs):
            if not isinstance(value, Tensor):
                raise StructfxError(
                    f"{spec.name} must be a torch.Tensor ({spec.describe()}), got {type(value).__name__}"
                )
            dtype = str(value.dtype).removeprefix("torch.")
            fits = len(value.shape) == len(spec.shape) and all(
                want is None or got == want for got, want in zip(value.shape, spec.shape)
            )
            if dtype != spec.dtype or not fits or value.device.type != "cpu":
                raise StructfxError(
                    f"{spec.name} got ({', '.join(map(str, value.shape))}) {dtype} on {value.device.type}, "
                    f"expected {spec.describe()} on cpu"
                )
