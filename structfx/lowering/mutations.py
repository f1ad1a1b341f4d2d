"""In-place updates of a forward, carried into the compiled function as eager PyTorch makes them.

torch.export functionalises a forward: an input it writes (``x.add_(1)``, ``x[0] = v``, ``F.relu(x,
inplace=True)``, an in-place op on a view of ``x``) comes back as an extra output holding the input's new
value (``OutputKind.USER_INPUT_MUTATION``), and so does a buffer or parameter it updates
(``BUFFER_MUTATION``, ``PARAMETER_MUTATION``; also ``self.n = self.n + 1``). TVM's importer keeps only the
user outputs and binds buffers as constants, which would lose the updates. ``expose_mutations`` makes every
update an output of the compiled function and every updated buffer or parameter an input of it (after the
user inputs), and says which is which (``structfx.runtime.signature.Mutations``): the compiled model then
writes each updated input back into the caller's tensor, and keeps its own copy of each updated buffer,
passing it in and replacing it with the new value on every call, as successive eager calls would.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor
from torch.export.graph_signature import InputKind, InputSpec, OutputKind

from structfx.errors import StructfxError
from structfx.runtime.signature import Mutations

#: Outputs the importer returns: the user's, and (once exposed) the updates.
RETURNED = (OutputKind.USER_OUTPUT, OutputKind.LOSS_OUTPUT)
#: Updates of a buffer or a parameter: the compiled model keeps the state across calls.
STATE_UPDATES = (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION)


def expose_mutations(program: torch.export.ExportedProgram) -> Mutations:
    """Rewrite the signature of ``program`` (functionalised: after ``run_decompositions``) in place so
    TVM's importer returns every update and takes every updated buffer or parameter as an input after the
    user inputs; returns where each update comes out. A program that updates nothing is left as it was."""
    signature = program.graph_signature
    user = [s.arg.name for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
    written, state = [], []
    for spec in signature.output_specs:
        if spec.kind == OutputKind.USER_INPUT_MUTATION:
            written.append((user.index(spec.target), spec))
        elif spec.kind in STATE_UPDATES:
            state.append((spec.target, spec))
    if not written and not state:
        return Mutations()
    names = [name for name, _ in state]
    for _, spec in (*written, *state):
        spec.kind = OutputKind.USER_OUTPUT
    returned = [s for s in signature.output_specs if s.kind in RETURNED]
    specs = {s.target: s for s in signature.input_specs if s.kind in (InputKind.BUFFER, InputKind.PARAMETER)}
    inputs = [s for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
    inputs += [InputSpec(InputKind.USER_INPUT, specs[name].arg, None) for name in names]
    inputs += [s for s in signature.input_specs if s.kind != InputKind.USER_INPUT and s.target not in names]
    signature.input_specs[:] = inputs
    for name in names:  # a non-persistent buffer is a constant, which the importer would bind by its name
        program.constants.pop(name, None)
    return Mutations(
        tuple((index, _position(returned, spec)) for index, spec in written),
        tuple((name, _position(returned, spec)) for name, spec in state),
    )


def _position(returned: list, spec) -> int:
    return next(i for i, s in enumerate(returned) if s is spec)


def initial_state(model: torch.nn.Module, mutations: Mutations) -> list[Tensor]:
    """Copies of the model's current values of the buffers and parameters ``mutations`` updates, in order."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return [named[name].detach().clone().contiguous() for name, _ in mutations.state]


def unregistered_write(error: Exception) -> StructfxError | None:
    """The StructfxError for torch's refusal to functionalise a forward that writes a tensor attribute which
    is not a registered buffer (``self.t = torch.zeros(3)`` in ``__init__``, ``self.t.add_(1)`` in forward):
    torch.export lifts such a tensor as a constant. None for any other error."""
    found = re.search(r"Constant (\S+) is mutated", str(error))
    if found is None:
        return None
    return StructfxError(
        f"[export] forward writes the tensor attribute {found.group(1)!r} in place, and it is not a registered "
        f"buffer: torch.export keeps such a tensor constant. Register it in its module's __init__ "
        f"(self.register_buffer(name, tensor)) and the compiled model carries its updates as its own state"
    )
