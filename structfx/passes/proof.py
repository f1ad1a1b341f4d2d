"""The safety net: a rewritten region, run with stand-ins, must reproduce the original bit for bit.

Each recorded call of the region (the example inputs and the first calibration batches) is replayed on
copies of its arguments; the outputs and the arguments after the call (an in-place forward changes them)
must equal the recorded ones exactly: same structure, dtype, shape and bits (NaN equal to NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from structfx.passes.recording import Call, evaluation_mode, preserved_state

#: How deep ``same`` looks into objects that are not tensors or containers (a cache holding tensors).
_OBJECT_DEPTH = 4


def disproof(region: nn.Module, calls: list[Call]) -> str | None:
    """Why ``region`` does not reproduce ``calls``, or None when it does on every one kept whole (at
    least one: a region never run on the example or the first calibration batches is not proven)."""
    kept = [call for call in calls if call.after is not None]
    if not kept:
        return "no recorded call to prove it on (neither the example inputs nor the first calibration batches)"
    with preserved_state(region):
        for call in kept:
            args, kwargs = call.fresh()
            buffers = {name: b.detach().clone() for name, b in region.named_buffers()}
            with torch.no_grad(), evaluation_mode(region):
                try:
                    output = region(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - any failure of the rewritten code is reported, not raised
                    return f"the rewritten code fails on batch {call.batch}: {type(e).__name__}: {_first_line(e)}"
            if not same(output, call.output):
                updated = [name for name, b in region.named_buffers() if not same(b, buffers.get(name))]
                if updated:
                    return (
                        f"its output depends on state its forward changes (buffer {', '.join(updated)}), so a replay "
                        f"of batch {call.batch} cannot be compared with the recorded call; update the buffer outside "
                        f"forward for its layers to be replaced"
                    )
                return f"its output differs from the original's on batch {call.batch}"
            if not same((args, kwargs), call.after):
                return f"it changes its inputs differently from the original on batch {call.batch}"
    return None


def same(a: object, b: object, depth: int = _OBJECT_DEPTH) -> bool:
    """Exact equality of nested outputs: tensors bit for bit, containers element-wise, objects by fields."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and _same_tensor(a.detach(), b.detach())
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, depth) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], depth) for k in a)
    if a is None or isinstance(a, (bool, int, float, str, complex, torch.dtype, torch.device, torch.Size)):
        return a == b or (isinstance(a, float) and a != a and b != b)
    if depth == 0 or not hasattr(a, "__dict__"):
        return True  # an opaque object: nothing to compare it by
    return same(vars(a), vars(b), depth - 1)


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
