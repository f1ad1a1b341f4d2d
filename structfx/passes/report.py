"""The report ``transform`` attaches to its result: one row per candidate layer, replaced or skipped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from structfx.errors import StructfxError

REPORT_ATTRIBUTE = "structfx_report"


@dataclass
class Row:
    name: str
    rule: str  # the rule that claimed the layer, "" where none could (a part that could not be traced)
    status: str  # "replaced", "skipped" or "fell back"
    reason: str = ""
    params_old: int = 0
    params_new: int = 0
    ops_old: int = 0
    ops_new: int = 0
    error: float | None = None  # ||new - old|| / ||old|| on the layer's recorded inputs
    padding: str = ""


@dataclass
class Report:
    """What ``structfx.transform`` did, one ``Row`` per candidate layer in model order: the rule, whether
    it was replaced, skipped (and why) or fell back (a part tracing could not reach), old and new
    parameter counts, multiply-adds per input row (for max-plus: add-max pairs; pools: window size),
    the layer's relative error ``||new - old|| / ||old||`` on its recorded inputs, and any padding.
    ``model_error`` is the same relative error of the whole model's outputs, on ``measured_on``
    ("calibration inputs" or "example inputs"). Get it with ``structfx.report(model)``, which raises
    StructfxError for a module that ``transform`` did not return; ``to_markdown()`` and ``to_dict()``
    render it."""

    rows: list[Row] = field(default_factory=list)
    model_error: float | None = None  # the whole model's output, transformed vs original
    measured_on: str = "example inputs"

    @property
    def replaced(self) -> list[Row]:
        return [row for row in self.rows if row.status == "replaced"]

    @property
    def skipped(self) -> list[Row]:
        return [row for row in self.rows if row.status != "replaced"]

    def to_dict(self) -> dict:
        return {
            "model_error": self.model_error,
            "measured_on": self.measured_on,
            "replaced": len(self.replaced),
            "skipped": len(self.skipped),
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
        lines.append(
            f"{len(self.replaced)} replaced, {len(self.skipped)} skipped; parameters of replaced layers "
            f"{total_old:,} -> {total_new:,}"
            + ("" if self.model_error is None else f"; model output relative error {self.model_error:.2e}")
            + f" (on {self.measured_on})"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def report(model: nn.Module) -> Report:
    """The report of a model returned by ``structfx.transform``."""
    found = getattr(model, REPORT_ATTRIBUTE, None)
    if not isinstance(found, Report):
        raise StructfxError(
            f"{type(model).__name__} carries no structfx report: pass the module that structfx.transform returned"
        )
    return found
