"""structfx.measure: the timing helpers the benchmarks and the demo use."""

import itertools
import time

from structfx.measure import block_medians


def test_block_medians_keeps_each_function_its_best_block():
    # "spoiled" is slow for its whole first block (a slow spell of the host), fast afterwards; a single
    # block would report the spell, the best of three rounds does not
    calls = itertools.count()
    order = []

    def spoiled():
        order.append("spoiled")
        time.sleep(0.02 if next(calls) < 3 else 0.001)

    def steady():
        order.append("steady")
        time.sleep(0.005)

    times = block_medians({"spoiled": spoiled, "steady": steady}, warmup=1, repeat=2, rounds=3)
    assert times["spoiled"] < times["steady"]
    assert order == (["spoiled"] * 3 + ["steady"] * 3) * 3  # blocks of its own, never call by call
