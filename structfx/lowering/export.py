"""torch.export for compilation: inference mode, a symbolic batch where the model allows one."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from structfx.errors import StructfxError
from structfx.passes.recording import evaluation_mode
from structfx.runtime.signature import TensorSpec, padded_rows

#: A symbolic batch is exported as ROW_MULTIPLE * q, so every kernel's row tiles divide it and need no
#: remainder loops; the compiled model pads other batch sizes (repeating the last row) and slices.
ROW_MULTIPLE = 16


def pad_rows(args: tuple, multiple: int, minimum: int = 0) -> tuple:
    """Each tensor's dim 0 grown to a multiple of ``multiple`` (and at least ``minimum``) by repeating
    its last row."""
    def pad(a):
        if not isinstance(a, Tensor) or a.dim() == 0 or a.shape[0] == 0:
            return a
        rows = max(minimum, padded_rows(a.shape[0], multiple))
        if rows == a.shape[0]:
            return a
        return torch.cat([a, a[-1:].expand(rows - a.shape[0], *a.shape[1:])])

    return tuple(pad(a) for a in args)


def export_for_compile(model: nn.Module, args: tuple) -> tuple[torch.export.ExportedProgram, bool]:
    """Export in eval mode with dim 0 of every input as one symbolic batch (ROW_MULTIPLE * q); static
    shapes where the model pins the batch. Returns the program and whether its batch is symbolic."""
    multiple_of = ROW_MULTIPLE * torch.export.Dim("q")
    dynamic = tuple({0: multiple_of} if isinstance(a, Tensor) and a.dim() > 0 else None for a in args)
    with evaluation_mode(model), torch.no_grad():
        try:
            example = pad_rows(args, ROW_MULTIPLE, minimum=2 * ROW_MULTIPLE)  # q = 1 would be specialised
            return torch.export.export(model, example, dynamic_shapes=dynamic, strict=False), True
        except Exception:  # the model pins the batch size: compile it static
            try:
                return torch.export.export(model, args, strict=False), False
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise StructfxError(
                    f"torch.export could not capture {type(model).__name__}: {first}. compile needs an exportable "
                    f"forward (no data-dependent Python control flow); structfx.transform's result is exportable "
                    f"where the original model is"
                ) from e


def input_specs(program: torch.export.ExportedProgram) -> list[TensorSpec]:
    kinds = torch.export.graph_signature.InputKind
    user = {s.arg.name for s in program.graph_signature.input_specs if s.kind == kinds.USER_INPUT}
    return [_spec(n.name, n.meta["val"]) for n in program.graph.nodes if n.op == "placeholder" and n.name in user]


def output_specs(program: torch.export.ExportedProgram) -> list[TensorSpec]:
    outputs = next(n for n in program.graph.nodes if n.op == "output").args[0]
    return [_spec(f"output{i}", node.meta["val"]) for i, node in enumerate(outputs)]


def _spec(name: str, value: Tensor) -> TensorSpec:
    shape = tuple(int(d) if isinstance(d, int) or not hasattr(d, "node") else None for d in value.shape)
    return TensorSpec(name, shape, str(value.dtype).removeprefix("torch."))
