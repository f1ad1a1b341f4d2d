"""The report ``transform`` attaches to its result: one row per candidate layer, replaced or skipped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

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

    def plot(self, path: str | Path) -> Path:
        """Parameters (old vs new) and relative error per replaced layer, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.replaced
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3, 0.35 * len(rows) + 1.5)))
        names = [r.name for r in rows]
        positions = range(len(rows))
        left.barh([p + 0.2 for p in positions], [r.params_old for r in rows], height=0.4, label="old")
        left.barh([p - 0.2 for p in positions], [r.params_new for r in rows], height=0.4, label="new")
        left.set_yticks(list(positions), names, fontsize=7)
        left.set_xlabel("parameters")
        left.legend()
        right.barh(list(positions), [r.error or 0.0 for r in rows])
        right.set_yticks(list(positions), [""] * len(rows))
        right.set_xlabel(f"relative error on {self.measured_on}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def report(model: nn.Module) -> Report:
    """The report of a model returned by ``structfx.transform``."""
    found = getattr(model, REPORT_ATTRIBUTE, None)
    if not isinstance(found, Report):
        raise StructfxError(
            f"{type(model).__name__} carries no structfx report: pass the module that structfx.transform returned"
        )
    return found
