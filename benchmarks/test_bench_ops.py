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
    if case.name not in _INPUTS:  # one set of inputs per case, shared by its providers
        _INPUTS.clear()
        _INPUTS[case.name] = case.make_inputs()
    return _INPUTS[case.name]


PARAMS = [pytest.param(case, provider, id=f"{case.name}-{provider}")
          for case in CASES for provider in case.providers
          if PROVIDERS is None or provider in PROVIDERS.split(",")]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_op(benchmark, case, provider):
    inputs = _inputs(case)
    fn = case.providers[provider](inputs)
    with torch.no_grad():
        for _ in range(3):  # warm-up (and compilation)
            fn()
        benchmark.extra_info.update(
            op=case.op, case=case.name, provider=provider, description=case.description,
            bytes=inputs["bytes"], threads=torch.get_num_threads(), peak_bytes=peak_memory_bytes(fn))
        benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=2, iterations=1)
