"""Time and memory measurements for the demo and the benchmarks (never for tests' pass/fail on speed)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfile


def median_seconds(fn: Callable[[], object], warmup: int = 3, repeat: int = 15) -> float:
    """Median wall time of ``fn()`` after ``warmup`` untimed calls."""
    return interleaved_medians({"fn": fn}, warmup, repeat)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int = 3, rounds: int = 15) -> dict[str, float]:
    """Median wall time of each function, timed in interleaved rounds (A B C, A B C, ...).

    This host is noisy: interleaving makes a slow spell hit every candidate alike, so ratios hold.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def block_medians(
    fns: dict[str, Callable[[], object]], warmup: int = 2, repeat: int = 7, rounds: int = 3
) -> dict[str, float]:
    """Each function timed in blocks of its own (``warmup`` untimed calls, then the median of ``repeat``
    consecutive calls), the blocks taken in ``rounds`` rounds (A-block B-block, A-block B-block, ...);
    the best block median of each function, in seconds.

    For functions that must not alternate call by call (TVM's and torch's thread pools spin after a call
    and slow each other), on a noisy host: a slow spell that spoils one block is outvoted by the other
    rounds, so it does not land on one candidate alone.
    """
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], median_seconds(fn, warmup, repeat))
    return best


def peak_allocated_bytes(step: Callable[[], object]) -> int:
    """Peak of the bytes torch allocates (CPU) while ``step`` runs, from the profiler's allocation timeline."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    current = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak
