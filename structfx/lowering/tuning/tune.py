"""``structfx.tune``: MetaSchedule over every kernel of a model, resumable, local or over RPC.

Our kernels are searched over their hand schedules' knobs (tile sizes), the others over MetaSchedule's
standard CPU design space (tasks.py), each by replaying its space with fresh samples. Each kernel's hand
schedule (what compile gives it without a database) is measured first and filed as a record, so the best
record of a workload is never slower than the hand schedule as measured, and compile keeps the hand
schedule wherever tuning found nothing better. Measurements go to the database directory as they finish.
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
import tempfile
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch import Tensor, nn

from structfx.errors import StructfxError, require_module, require_path
from structfx.lowering.compat import Schedule, Target, derived_object, meta_schedule, tar, tirx, tvm
from structfx.lowering.target import resolve_target
from structfx.lowering.tuning.database import Record, RecordsDatabase, TuningDatabase, plain_json, workload_hash
from structfx.lowering.tuning.tasks import Task, context, extract_tasks, without_tensor_intrinsics, workload_of
from structfx.runtime.host import use_every_core

ms = meta_schedule
#: In the error of a measurement its runner stopped ("LocalRunner: Timeout, killed after 30 seconds").
TIMEOUT = "Timeout, killed after"


def tune(
    model: nn.Module,
    example_inputs: Tensor | tuple,
    target=None,
    trials: int = 64,
    database: str | Path = "tune_db",
    rpc: str | None = None,
    key: str | None = None,
    progress: bool = True,
) -> Path:
    """Tune every kernel of ``model`` that has something to tune, up to ``trials`` measurements each (the
    hand schedule's included); a run again continues from what ``database`` holds.

    ``model`` is an ``nn.Module`` (e.g. ``structfx.transform``'s result) and ``example_inputs`` a tensor
    or tuple of tensors as for ``structfx.compile``: the batch dimension is symbolic, and kernels are
    measured at 256 rows. ``target`` as for compile (default: this CPU). ``database`` is a directory,
    made if missing; its ``records.jsonl`` gets one line per finished measurement (kernel, trace, mean
    seconds per call). ``rpc="host:port"`` with ``key`` measures on the RPC servers registered under that
    key at that TVM tracker, building locally. Returns the database's path.

    Raises StructfxError for ``trials < 1``, a database tuned for another target or TVM version or
    holding other files, a malformed or unreachable ``rpc``, a hand schedule that does not build or run,
    and what compile raises for the model. Leaves no worker process and no build directory behind.
    """
    from structfx.lowering.build import legalize_module, lower_to_relax
    from structfx.lowering.export import example_arguments, export_for_compile

    require_module(model, "tune")
    require_path(database, "database")
    args = example_arguments(example_inputs, "tune")
    if trials < 1:
        raise StructfxError(f"trials={trials} must be at least 1")
    tvm_target = resolve_target(target)
    runner = make_runner(rpc, key)
    try:
        mod, _ = lower_to_relax(export_for_compile(model, args), tvm_target)
        db = TuningDatabase(database, tvm_target, create=True)
        tasks = extract_tasks(legalize_module(mod, tvm_target), tvm_target)
        records = RecordsDatabase(db, tvm_target, {workload_hash(t.workload): t.name for t in tasks})
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[best]}")]
        # the run's candidate libraries, also those built but not measured when it stops, are removed with it
        with tempfile.TemporaryDirectory(prefix="structfx-tune-") as builds, without_tensor_intrinsics(), \
                Progress(*columns, disable=not progress) as bar:
            builder = InProcessBuilder(builds)
            for task in tasks:
                _tune_task(task, tvm_target, trials, records, builder, runner, database, bar)
    finally:
        runner.pool.shutdown()  # its measuring worker process (LocalRunner and RPCRunner alike)
    return Path(database)


def make_runner(rpc: str | None, key: str | None):
    """A local runner, or one on TVM's RPC tracker at ``host:port`` (checked reachable within seconds)."""
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator, initializer=use_every_core)
    host, _, port = rpc.rpartition(":")
    if not host or not port.isdigit() or not key:
        raise StructfxError(f"rpc={rpc!r} key={key!r}: give the tracker as HOST:PORT and the servers' --key")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise StructfxError(f"cannot reach the RPC tracker at {host}:{port}: {e.strerror or e}") from None
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                                 session_priority=1, session_timeout_sec=60)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator)


def _tune_task(task: Task, target: Target, trials: int, records: RecordsDatabase, builder, runner, work_dir,
               bar) -> None:
    db, key = records.records, workload_hash(task.workload)
    if not db.of(key):
        db.add(_measure_hand_schedule(task, target, key, builder, runner))
    hand = next((r.seconds for r in db.of(key) if r.hand), None)
    done = len(db.of(key))
    line = bar.add_task(task.name, total=trials, completed=min(done, trials), best="")
    _show_best(bar, line, db, key, hand)
    if done >= trials:
        return
    ms.tune_tasks(
        tasks=[context(task.name, task.workload, task.space, target, logging.getLogger("structfx.tune"))],
        task_weights=[1.0], work_dir=str(work_dir), max_trials_global=trials - done,
        num_trials_per_iter=min(trials - done, 8), builder=builder, runner=runner, database=records,
        cost_model="random", task_scheduler="round-robin",
        measure_callbacks=[ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact(),
                           _Progress(bar, line, db, key, hand)],
    )


def _measure_hand_schedule(task: Task, target: Target, key: str, builder, runner) -> Record:
    built = builder.build([ms.builder.BuilderInput(task.hand.mod, target)])[0]
    if built.error_msg:
        raise StructfxError(f"the hand schedule of {task.name} did not build: {built.error_msg.splitlines()[0]}")
    try:
        args_info = ms.arg_info.ArgInfo.from_prim_func(task.hand.mod["main"])
        device = "cuda" if target.kind.name == "cuda" else "cpu"
        result = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args_info)])[0].result()
    finally:
        shutil.rmtree(Path(built.artifact_path).parent)
    if result.error_msg and TIMEOUT in result.error_msg:
        # slower than the runner allows for its calls: any candidate that completes them is faster
        return Record(task.name, key, plain_json(task.hand.trace.as_json()), math.inf, hand=True)
    if result.error_msg:
        raise StructfxError(f"measuring {task.name} failed: {result.error_msg.strip().splitlines()[-1]}")
    seconds = sum(float(s) for s in result.run_secs) / len(result.run_secs)
    return Record(task.name, key, plain_json(task.hand.trace.as_json()), seconds, hand=True)


def _show_best(bar, line, db: TuningDatabase, key: str, hand: float | None) -> None:
    best = db.best(key)
    text = "" if best is None or math.isinf(best.seconds) else f"best {best.seconds * 1e3:.3f} ms"
    if text and hand and math.isinf(hand):
        text += " (the hand schedule timed out)"
    elif text and hand:
        text += f", {hand / best.seconds:.2f}x the hand schedule"
    bar.update(line, best=text)


@derived_object
class InProcessBuilder(ms.builder.PyBuilder):
    """Builds candidates in this process: no worker to start and no module to pickle across (pickling
    an IRModule segfaults with apache-tvm-ffi 0.1.15, which is why pyproject pins 0.1.14).

    Each candidate's library goes to its own directory under ``root``, which the tuning run owns and
    removes when it ends: MetaSchedule's RemoveBuildArtifact removes a measured candidate's directory,
    but not those of candidates built and not yet measured when a run is interrupted or fails."""

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        self.root = Path(root)

    def build(self, build_inputs):
        results = []
        for build_input in build_inputs:
            directory = None
            try:
                library = tvm.compile(build_input.mod, target=build_input.target)
                directory = Path(tempfile.mkdtemp(prefix="candidate-", dir=self.root))
                library.export_library(str(directory / "candidate.tar"), fcompile=tar)
                results.append(ms.builder.BuilderResult(str(directory / "candidate.tar"), None))
            except Exception as e:  # a candidate that does not build is a result, not a failure of the run
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
                results.append(ms.builder.BuilderResult(None, f"{type(e).__name__}: {e}"))
        return results


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Advances the task's progress bar and shows its best record so far."""

    def __init__(self, bar, line, db: TuningDatabase, key: str, hand: float | None) -> None:
        super().__init__()
        self.bar, self.line, self.db, self.key, self.hand = bar, line, db, key, hand

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.bar.advance(self.line, len(runner_results))
        _show_best(self.bar, self.line, self.db, self.key, self.hand)


def apply_database(mod: tvm.IRModule, target: Target, database: str | Path) -> tvm.IRModule:
    """Schedule each kernel of a legalized module by the best record its workload has in ``database``
    (the hand schedule's own record included); kernels without records, or whose best record is the hand
    schedule's, keep the rules' hand schedules."""
    db = TuningDatabase(database, target, create=False)
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        best = db.best(workload_hash(workload_of(func)))
        if best is None or best.hand:  # the rules' own schedule: a rule may rebuild the function (no trace)
            continue
        sch = Schedule(func)
        tvm.s_tir.schedule.Trace.apply_json_to_schedule(best.trace, sch)
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod
