"""Every provider of every case, timed in one process, interleaved round by round.

Run through `make bench` (benchmarks/run.py), which writes the report. Not a
test of speed: nothing here asserts a timing.

The providers of a case take turns: each round calls every provider once
untimed (its caches and the allocator warmed again after the provider before
it) and then once timed, in an order that rotates from round to round. A
provider's median is then a median of steady-state calls, like back-to-back
rounds, but the providers' rounds are interleaved in time, so the machine's
drift (here +-25% within minutes) moves every provider's median together and
the ratios between them stay put; timed one provider after another, the
same drift moved a ratio by as much.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import pytest
import torch

from benchmarks.cases import CASES
from benchmarks.memory import peak_memory_bytes

ROUNDS = int(os.environ.get("MEDMTL_BENCH_ROUNDS", "30"))
PROVIDERS = os.environ.get("MEDMTL_BENCH_PROVIDERS")  # comma-separated subset, for quick runs
RESULTS_JSON = os.environ.get("MEDMTL_BENCH_JSON")    # where the timings go (benchmarks/run.py sets it)
WARMUP_CALLS = 3                                      # per provider before the rounds (and compilation)

_RESULTS: list[dict] = []


def _selected(case) -> dict:
    return {name: make for name, make in case.providers.items()
            if PROVIDERS is None or name in PROVIDERS.split(",")}


def _rounds(case) -> int:
    rounds = case.rounds or ROUNDS
    return min(rounds, ROUNDS) if "MEDMTL_BENCH_ROUNDS" in os.environ else rounds


def time_interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    """{name: zero-argument callable} -> {name: seconds of each timed call}.

    Each round calls every callable untimed, then timed, in the order of
    `calls` rotated by the round's number; the garbage collector is off
    while the rounds run.
    """
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn = calls[name]
                fn()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def _write_results() -> None:
    if RESULTS_JSON:
        Path(RESULTS_JSON).write_text(json.dumps({"results": _RESULTS}, indent=1))


@pytest.mark.parametrize("case", [case for case in CASES if _selected(case)], ids=lambda case: case.key)
def test_case(case):
    inputs = case.make_inputs()
    calls = {name: make(inputs) for name, make in _selected(case).items()}
    with torch.set_grad_enabled(not case.inference):
        for fn in calls.values():
            for _ in range(WARMUP_CALLS):
                fn()
        peaks = {name: peak_memory_bytes(fn) for name, fn in calls.items()}
        times = time_interleaved(calls, _rounds(case))
    for name in calls:
        _RESULTS.append(dict(op=case.op, case=case.name, provider=name, description=case.description,
                             group=case.group, bytes=inputs.get("bytes", 0), flops=inputs.get("flops", 0), threads=torch.get_num_threads(),
                             peak_bytes=peaks[name], seconds=times[name]))
    _write_results()
