"""The user's model is left as compile found it, and compile says what it does not carry over.

Exporting runs forward (the eager check of the example inputs, and tracing), and a forward may update a
buffer (``self.n += 1``, running statistics): every parameter and buffer is restored afterwards. The
updates torch.export records are carried by the compiled model as its own state
(structfx.lowering.mutations); any other change is named in a warning. The model is exported in eval
mode; modules in training mode that behave differently are named in a warning."""

from __future__ import annotations

import contextlib
import warnings

from torch import nn

from structfx.errors import module_place
from structfx.passes.recording import preserved_state


@contextlib.contextmanager
def restored_state(model: nn.Module):
    """Yield a list that, on exit, holds the names of the parameters and buffers the body changed
    (in place or by assigning a new tensor); restore them all to their values on entry."""
    before = {name: (tensor, tensor.detach().clone()) for name, tensor in _named_tensors(model)}
    changed: list[str] = []
    with preserved_state(model):
        try:
            yield changed
        finally:
            after = dict(_named_tensors(model))
            changed.extend(
                name for name, (tensor, value) in before.items()
                if after.get(name) is not tensor or tensor.shape != value.shape or not tensor.detach().equal(value)
            )


def _named_tensors(model: nn.Module):
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def warn_state_updates(model: nn.Module, names: list[str]) -> None:
    """Warn that compiling ``model`` changed the parameters/buffers ``names`` where the exported program does
    not update them: the compiled model does not carry those changes."""
    if names:
        warnings.warn(
            f"{type(model).__name__}.forward updates {', '.join(names)} where torch.export does not see it: the "
            f"compiled model computes every call from their values at compile time and does not update them "
            f"(the model itself is left unchanged)",
            stacklevel=3,
        )


def warn_training_mode(model: nn.Module, stacklevel: int) -> None:
    """Warn that compile runs ``model`` in eval mode where one of its modules is in training mode and its
    forward reads ``self.training`` (Dropout, BatchNorm, a custom module that branches on it): the
    compiled model keeps the eval behaviour. Modules whose forward does not read the mode are not named."""
    named = [
        module_place(name, type(module).__name__)
        for name, module in model.named_modules()
        if module.training and "training" in getattr(getattr(type(module).forward, "__code__", None), "co_names", ())
    ]
    if named:
        shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
        warnings.warn(
            f"compile runs the model in eval mode: {shown} {'is' if len(named) == 1 else 'are'} in training mode; "
            f"call model.eval() first to silence this",
            stacklevel=stacklevel + 1,
        )
