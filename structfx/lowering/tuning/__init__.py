"""MetaSchedule tuning of our kernels with a persistent, resumable database."""

from structfx.lowering.tuning.tune import apply_database, tune

__all__ = ["apply_database", "tune"]
