"""Every provider of every case, timed by pytest-benchmark in one process.

Run through `make bench` (benchmarks/run.py), which writes the report. Not a
test of speed: nothing here asserts a timing.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.cases import CASES
from benchmarks.memory import peak_memory_bytes

ROUNDS = int(os.environ.get("MEDMTL_BENCH_ROUNDS", "30"))
PROVIDERS = os.environ.get("MEDMTL_BENCH_PROVIDERS")  # comma-separated subset, for quick runs

_INPUTS: dict[str, dict] = {}


def _inputs(case):
    if case.key not in _INPUTS:  # one set of inputs per case, shared by its providers
        _INPUTS.clear()
        _INPUTS[case.key] = case.make_inputs()
    return _INPUTS[case.key]


PARAMS = [pytest.param(case, provider, id=f"{case.key}-{provider}")
          for case in CASES for provider in case.providers
          if PROVIDERS is None or provider in PROVIDERS.split(",")]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_op(benchmark, case, provider):
    inputs = _inputs(case)
    fn = case.providers[provider](inputs)
    with torch.set_grad_enabled(not case.inference):
        for _ in range(3):  # warm-up (and compilation)
            fn()
        benchmark.extra_info.update(
            op=case.op, case=case.name, provider=provider, description=case.description, group=case.group,
            bytes=inputs.get("bytes", 0), threads=torch.get_num_threads(), peak_bytes=peak_memory_bytes(fn))
        rounds = case.rounds or ROUNDS
        if "MEDMTL_BENCH_ROUNDS" in os.environ:
            rounds = min(rounds, ROUNDS)
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
