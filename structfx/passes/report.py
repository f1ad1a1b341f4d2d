"""The report ``transform`` attaches to its result: one row per candidate layer, replaced or skipped."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from structfx.errors import StructfxError
from structfx.nn.fitting import relative_error

REPORT_ATTRIBUTE = "structfx_report"


@dataclass
class Row:
    name: str
    rule: str  # the rule that claimed the layer, "" where none could (a part that could not be traced)
    status: str  # "replaced", "skipped" (a layer left as it was) or "fell back" (a part that was not traced)
    reason: str = ""
    params_old: int = 0
    params_new: int = 0
    ops_old: int = 0
    ops_new: int = 0
    error: float | None = None  # ||new - old|| / ||old|| on the layer's recorded inputs; None: none recorded
    padding: str = ""


@dataclass
class Report:
    """What ``structfx.transform`` did, one ``Row`` per candidate layer in model order and one per part
    that fell back (a part tracing could not reach): the rule, whether it was replaced, skipped (and why)
    or fell back, old and new parameter counts, multiply-adds per input row (for max-plus: add-max pairs;
    pools: window size), the layer's relative error ``||new - old|| / ||old||`` on its recorded inputs,
    and any padding. ``already_structured`` names the layers that were structured before transform ran
    (a model transformed twice): transform leaves them as they are.

    ``output_errors`` maps each output (its pytree path, e.g. ``['pooler_output']``; ``output`` for a
    single tensor) to ``||new - old|| / ||old||`` over all measured batches (``measured_on``: "calibration
    inputs" or "example inputs"), None where no element was measured (zero-row batches). ``model_error``
    is the largest of them, so that no output's error hides behind another's scale. Get a report with
    ``structfx.report(model)``, which raises StructfxError for a module that ``transform`` did not
    return; ``to_markdown()`` and ``to_dict()`` render it.
    """

    rows: list[Row] = field(default_factory=list)
    output_errors: dict[str, float | None] = field(default_factory=dict)
    measured_on: str = "example inputs"
    already_structured: list[str] = field(default_factory=list)

    @property
    def model_error(self) -> float | None:
        measured = [error for error in self.output_errors.values() if error is not None]
        return max(measured) if measured else None

    @property
    def replaced(self) -> list[Row]:
        return [row for row in self.rows if row.status == "replaced"]

    @property
    def skipped(self) -> list[Row]:
        """Layers a rule claimed and left as they were (with the reason)."""
        return [row for row in self.rows if row.status == "skipped"]

    @property
    def fell_back(self) -> list[Row]:
        """Parts that could not be traced: their children were rewritten one by one instead."""
        return [row for row in self.rows if row.status == "fell back"]

    def to_dict(self) -> dict:
        return {
            "model_error": self.model_error,
            "output_errors": dict(self.output_errors),
            "measured_on": self.measured_on,
            "replaced": len(self.replaced),
            "skipped": len(self.skipped),
            "fell_back": len(self.fell_back),
            "already_structured": list(self.already_structured),
            "rows": [asdict(row) for row in self.rows],
        }

    def to_markdown(self) -> str:
        lines = [
            "| layer | rule | status | params old -> new | ops/row old -> new | rel. error | padding | why |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            error = "" if r.error is None else f"{r.error:.2e}"
            params, ops = (f"{r.params_old:,}", f"{r.ops_old:,}") if r.rule else ("", "")
            if r.status == "replaced":
                params, ops = f"{params} -> {r.params_new:,}", f"{ops} -> {r.ops_new:,}"
            cells = [r.name, r.rule, r.status, params, ops, error, r.padding, r.reason]
            lines.append("| " + " | ".join(cells) + " |")
        total_old = sum(r.params_old for r in self.replaced)
        total_new = sum(r.params_new for r in self.replaced)
        lines.append("")
        if self.already_structured:
            shown = ", ".join(self.already_structured[:5]) + (", ..." if len(self.already_structured) > 5 else "")
            lines.append(
                f"{len(self.already_structured)} layer(s) already structured before this transform, left as they "
                f"are ({shown}): transform the original model to structure them differently"
            )
        lines.append(
            f"{len(self.replaced)} replaced, {len(self.skipped)} skipped, {len(self.fell_back)} fell back "
            f"(not traced); parameters of replaced layers {total_old:,} -> {total_new:,}"
        )
        errors = ", ".join(
            f"{name} {'not measured (no elements)' if error is None else f'{error:.2e}'}"
            for name, error in self.output_errors.items()
        )
        lines.append(f"model output relative error on {self.measured_on}: {errors or 'no tensor outputs'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def output_errors(outputs: list, references: list) -> dict[str, float | None]:
    """Relative error of each tensor output (by pytree path), all batches together; None for an output
    with no elements in any batch."""
    got: dict[str, list[Tensor]] = defaultdict(list)
    want: dict[str, list[Tensor]] = defaultdict(list)
    for output, reference in zip(outputs, references):
        new_leaves = dict(_tensor_leaves(output))
        for name, old in _tensor_leaves(reference):
            if name in new_leaves:
                got[name].append(new_leaves[name].detach().flatten().double())
                want[name].append(old.detach().flatten().double())
    return {name: relative_error(torch.cat(got[name]), torch.cat(want[name])) for name in want}


def _tensor_leaves(value: object) -> list[tuple[str, Tensor]]:
    leaves, _ = tree_flatten_with_path(value)
    return [(keystr(path) or "output", leaf) for path, leaf in leaves if isinstance(leaf, Tensor)]


def report(model: nn.Module) -> Report:
    """The report of a model returned by ``structfx.transform``."""
    found = getattr(model, REPORT_ATTRIBUTE, None)
    if not isinstance(found, Report):
        raise StructfxError(
            f"{type(model).__name__} carries no structfx report: pass the module that structfx.transform returned"
        )
    return found
