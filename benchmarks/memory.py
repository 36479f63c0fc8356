"""Peak memory of a call, from the allocation events of torch's profiler.

The peak is the highest running sum of bytes allocated (minus freed) through
torch's allocators during the call: what the call adds on top of its inputs.
Works for CPU tensors (and CUDA ones, where torch.cuda.max_memory_allocated
would do as well).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep kineto's start/stop lines quiet


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        result = fn()
        del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak
