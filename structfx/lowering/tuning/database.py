"""The tuning database: a directory with a header (what it was tuned for) and records.jsonl.

One JSON line per measurement -- kernel, workload hash, schedule trace, seconds -- appended and flushed
as soon as it is measured, so a run stopped at any moment (Ctrl-C, SIGKILL) keeps every finished
measurement; at most a torn last line is left, and opening drops it. MetaSchedule writes into it through
``RecordsDatabase``, a ``PyDatabase`` given to ``tune_tasks``. (MetaSchedule's own JSONDatabase crashed
with apache-tvm-ffi 0.1.15 when it serialized a workload, and a record here also needs the structfx-side
facts, kernel name and hand-schedule flag, that it has no place for.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from structfx.errors import StructfxError
from structfx.lowering.compat import Schedule, Target, derived_object, meta_schedule, tvm

HEADER, RECORDS = "structfx_tuning.json", "records.jsonl"


@dataclass(frozen=True)
class Record:
    kernel: str
    workload: str  # structural hash of the workload (the kernel with its batch fixed)
    trace: list  # the schedule's trace, as plain JSON
    seconds: float  # mean per call; inf for a hand schedule slower than the runner's timeout allows
    hand: bool  # the hand schedule's own measurement


class TuningDatabase:
    """Records of one directory, for one target and TVM version."""

    def __init__(self, directory: str | Path, target: Target, create: bool) -> None:
        self.root = Path(directory)
        header = {"target": str(target), "tvm_version": tvm.__version__}
        if not (self.root / HEADER).is_file():
            if not create:
                raise StructfxError(f"{self.root} is not a structfx tuning database (no {HEADER}); "
                                    f"make one with structfx tune")
            if self.root.exists() and any(p.name not in (RECORDS, "logs") for p in self.root.iterdir()):
                raise StructfxError(f"{self.root} holds other files; give structfx tune an empty or new directory")
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / HEADER).write_text(json.dumps(header, indent=2) + "\n")
        try:
            found = json.loads((self.root / HEADER).read_text())
        except ValueError:
            raise StructfxError(f"{self.root / HEADER} is corrupt; tune into a new directory") from None
        for key, wanted in header.items():
            if found.get(key) != wanted:
                raise StructfxError(
                    f"{self.root} was tuned with {key} {found.get(key)}; this run uses {wanted}: its records "
                    f"do not apply. Tune into a new directory"
                )
        self.records = self._read()

    def _read(self) -> list[Record]:
        path = self.root / RECORDS
        if not path.is_file():
            return []
        lines = path.read_bytes().splitlines(keepends=True)
        records = []
        for number, line in enumerate(lines):
            try:
                records.append(Record(**json.loads(line)))
            except (ValueError, TypeError):
                if number != len(lines) - 1:
                    raise StructfxError(f"{path} line {number + 1} is corrupt; tune into a new directory") from None
                path.write_bytes(b"".join(lines[:-1]))  # the torn last line of a killed run
        return records

    def add(self, record: Record) -> None:
        """Append one record and flush it to disk before returning."""
        with open(self.root / RECORDS, "a") as f:
            f.write(json.dumps(record.__dict__) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def of(self, workload: str) -> list[Record]:
        return [r for r in self.records if r.workload == workload]

    def best(self, workload: str) -> Record | None:
        return min(self.of(workload), key=lambda r: r.seconds, default=None)


def workload_hash(workload: tvm.IRModule) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(workload) & 0xFFFFFFFFFFFFFFFF:016x}"


def plain_json(value):
    """TVM's JSON-like objects (Array, Map, IntImm, FloatImm, String) as plain Python."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "value"):
        return value.value
    if hasattr(value, "items"):
        return {str(k): plain_json(v) for k, v in value.items()}
    return [plain_json(v) for v in value]


#: What MetaSchedule files as the run time of a candidate that failed to build or run.
FAILED_SECONDS = 1e9


@derived_object
class RecordsDatabase(meta_schedule.database.PyDatabase):
    """A TuningDatabase as MetaSchedule's database: each tuning record ``tune_tasks`` commits is filed in
    records.jsonl at once (failed candidates are not), and its queries read the records back as traces
    replayed on the workloads. ``kernels`` names each workload hash (the records carry kernel names)."""

    def __init__(self, records: TuningDatabase, target: Target, kernels: dict[str, str]) -> None:
        super().__init__()
        self.records, self.target, self.kernels = records, target, kernels
        self.workloads: dict[str, meta_schedule.database.Workload] = {}

    def has_workload(self, mod: tvm.IRModule) -> bool:
        return workload_hash(mod) in self.workloads

    def commit_workload(self, mod: tvm.IRModule):
        key = workload_hash(mod)
        if key not in self.workloads:
            self.workloads[key] = meta_schedule.database.Workload(mod)
        return self.workloads[key]

    def commit_tuning_record(self, record) -> None:
        seconds = [float(s) for s in (record.run_secs or [])]
        if not seconds or max(seconds) >= FAILED_SECONDS:
            return
        key = workload_hash(record.workload.mod)
        trace = plain_json(record.trace.as_json())
        self.records.add(Record(self.kernels[key], key, trace, sum(seconds) / len(seconds), hand=False))

    def get_top_k(self, workload, top_k: int) -> list:
        best = sorted(self.records.of(workload_hash(workload.mod)), key=lambda r: r.seconds)[:top_k]
        return [self._tuning_record(r, workload) for r in best]

    def get_all_tuning_records(self) -> list:
        return [self._tuning_record(r, w) for key, w in self.workloads.items() for r in self.records.of(key)]

    def __len__(self) -> int:
        return len(self.records.records)

    def _tuning_record(self, record: Record, workload):
        sch = Schedule(workload.mod)
        tvm.s_tir.schedule.Trace.apply_json_to_schedule(record.trace, sch)
        args = meta_schedule.arg_info.ArgInfo.from_prim_func(workload.mod["main"])
        return meta_schedule.database.TuningRecord(sch.trace, workload, [record.seconds], self.target, args)
