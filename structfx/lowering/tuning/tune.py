"""``structfx.tune``: MetaSchedule over the knobs of our hand schedules, resumable, local or over RPC.

The design space of each kernel is its hand schedule with the tile sizes sampled (``OpRule.schedule``
with ``tunable=True``; for TVM's own ops, the generic rule's split of elementwise loops), searched by
replaying it with fresh samples. The hand schedule itself is
measured first and filed as a record, so the best record of a workload is never slower than the hand
schedule as measured, and compile keeps the hand schedule wherever tuning found nothing better.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import tempfile
import types
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch import Tensor, nn

from structfx.errors import StructfxError
from structfx.lowering.compat import Schedule, Target, derived_object, meta_schedule, tar, tirx, tvm
from structfx.lowering.target import resolve_target
from structfx.lowering.tuning.database import Record, TuningDatabase, plain_json, workload_hash
from structfx.lowering.tuning.tasks import Task, extract_tasks, hand_schedule, workload_of

ms = meta_schedule


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
    """Tune every kernel of ``model`` (ours, and TVM's for the rest of the module) up to ``trials``
    measurements each, the hand schedule's included; runs again continue from what ``database`` holds.
    ``rpc="host:port"`` with ``key`` measures on the RPC servers registered under that key at that TVM
    tracker, building locally."""
    from structfx.lowering.build import legalize_module, lower_to_relax
    from structfx.lowering.export import export_for_compile

    if trials < 1:
        raise StructfxError(f"trials={trials} must be at least 1")
    tvm_target = resolve_target(target)
    runner = make_runner(rpc, key)
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    mod, _ = lower_to_relax(export_for_compile(model, args), tvm_target)
    db = TuningDatabase(database, tvm_target, create=True)
    builder = InProcessBuilder()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[best]}")]
    with Progress(*columns, disable=not progress) as bar:
        for task in extract_tasks(legalize_module(mod, tvm_target), tvm_target):
            _tune_task(task, tvm_target, trials, db, builder, runner, database, bar)
    return Path(database)


def make_runner(rpc: str | None, key: str | None):
    """A local runner, or one on TVM's RPC tracker at ``host:port`` (checked reachable within seconds)."""
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator)
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


def _tune_task(task: Task, target: Target, trials: int, db: TuningDatabase, builder, runner, work_dir, bar) -> None:
    key = workload_hash(task.workload)
    if not db.of(key):
        db.add(_measure_hand_schedule(task, target, key, builder, runner))
    hand = next((r.seconds for r in db.of(key) if r.hand), None)
    done = len(db.of(key))
    line = bar.add_task(task.name, total=trials, completed=min(done, trials), best="")
    _show_best(bar, line, db, key, hand)
    if done >= trials:
        return
    with _without_tensor_intrinsics():
        _search(task, target, trials - done, db, builder, runner, work_dir, bar, line, key, hand)


def _search(task: Task, target: Target, trials: int, db, builder, runner, work_dir, bar, line, key, hand) -> None:
    """Replay the task's tunable schedule ``trials`` times, filing each measurement as it finishes.

    Calls ``tune_tasks`` with a TuneContext of our own logger: ``tune_tir``'s per-directory file
    loggers fail on a second call in the same process (MetaSchedule's logging config parameterisation).
    """
    space = ms.space_generator.ScheduleFn(
        lambda sch: _sampled(task, sch, target), sch_rules=[], postprocs=[], mutator_probs={}
    )
    context = ms.TuneContext(
        mod=task.workload, target=target, space_generator=space, search_strategy="replay-trace",
        task_name=task.name, num_threads=1, logger=logging.getLogger("structfx.tune"),
    ).clone()
    ms.tune_tasks(
        tasks=[context], task_weights=[1.0], work_dir=str(work_dir), max_trials_global=trials,
        num_trials_per_iter=min(trials, 8), builder=builder, runner=runner, database=ms.database.MemoryDatabase(),
        cost_model="random", task_scheduler="round-robin",
        measure_callbacks=[ms.measure_callback.RemoveBuildArtifact(), _Recorder(task.name, key, db, bar, line, hand)],
    )


@contextlib.contextmanager
def _without_tensor_intrinsics():
    """MetaSchedule's TuneContext imports every tensorization intrinsic TVM has (parsing some 250
    TVMScript functions: about 40 s here) although our design spaces use none. Stand in an empty module
    while tuning; a real import later still gets the real one."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        del sys.modules[name]


def _sampled(task: Task, sch, target: Target):
    task.rule.schedule(sch, target, True)
    return sch


def _measure_hand_schedule(task: Task, target: Target, key: str, builder, runner) -> Record:
    sch = hand_schedule(task, target)
    built = builder.build([ms.builder.BuilderInput(sch.mod, target)])[0]
    if built.error_msg:
        raise StructfxError(f"the hand schedule of {task.name} did not build: {built.error_msg.splitlines()[0]}")
    args_info = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    result = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args_info)])[0].result()
    if result.error_msg:
        raise StructfxError(f"measuring {task.name} failed: {result.error_msg.strip().splitlines()[-1]}")
    seconds = sum(float(s) for s in result.run_secs) / len(result.run_secs)
    return Record(task.name, key, plain_json(sch.trace.as_json()), seconds, hand=True)


def _show_best(bar, line, db: TuningDatabase, key: str, hand: float | None) -> None:
    best = db.best(key)
    text = "" if best is None else f"best {best.seconds * 1e3:.3f} ms"
    if best is not None and hand:
        text += f", {hand / best.seconds:.2f}x the hand schedule"
    bar.update(line, best=text)


@derived_object
class InProcessBuilder(ms.builder.PyBuilder):
    """Builds candidates in this process: no worker to start and no module to pickle across (pickling
    an IRModule segfaults with apache-tvm-ffi 0.1.15, which is why pyproject pins 0.1.14)."""

    def build(self, build_inputs):
        results = []
        for build_input in build_inputs:
            try:
                library = tvm.compile(build_input.mod, target=build_input.target)
                path = Path(tempfile.mkdtemp(prefix="structfx-tune-")) / "candidate.tar"
                library.export_library(str(path), fcompile=tar)
                results.append(ms.builder.BuilderResult(str(path), None))
            except Exception as e:  # a candidate that does not build is a result, not a failure of the run
                results.append(ms.builder.BuilderResult(None, f"{type(e).__name__}: {e}"))
        return results


@derived_object
class _Recorder(ms.measure_callback.PyMeasureCallback):
    """Files each finished measurement in the database at once, and advances the task's progress bar."""

    def __init__(self, kernel: str, key: str, db: TuningDatabase, bar, line, hand: float | None) -> None:
        super().__init__()
        self.kernel, self.key, self.db, self.bar, self.line, self.hand = kernel, key, db, bar, line, hand

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        for candidate, result in zip(measure_candidates, runner_results):
            if result.error_msg is None and result.run_secs:
                seconds = sum(float(s) for s in result.run_secs) / len(result.run_secs)
                trace = plain_json(candidate.sch.trace.as_json())
                self.db.add(Record(self.kernel, self.key, trace, seconds, hand=False))
        self.bar.advance(self.line, len(runner_results))
        _show_best(self.bar, self.line, self.db, self.key, self.hand)


def apply_database(mod: tvm.IRModule, target: Target, database: str | Path) -> tvm.IRModule:
    """Schedule each kernel of a legalized module by the best record its workload has in ``database``
    (the hand schedule's own record included); kernels without records keep the rules' hand schedules."""
    db = TuningDatabase(database, target, create=False)
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        best = db.best(workload_hash(workload_of(func)))
        if best is None:
            continue
        sch = Schedule(func)
        tvm.s_tir.schedule.Trace.apply_json_to_schedule(best.trace, sch)
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod
