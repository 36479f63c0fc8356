"""The launch plans of csrc/cuda/launch_plan.h, as the emulation drivers hand them
over (write_plan in tests/cuda_emulation/driver_common.h): the buffers the torch
wrappers allocate around the launchers and how they reduce the partial sums to
the gradients. The *_cuda_emulated tests allocate and reduce exactly as the
plan says, so the arithmetic the wrappers run is the arithmetic tested."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tests.cuda_emulation_buffers import SENTINEL, Guarded, assert_written, guarded_output, scratch

MAX_RANK = 5
FIELDS = 4 + 3 * MAX_RANK + 1  # kPlanFields


@dataclass
class PlanBuffer:
    element: int                  # 0 op dtype, 1 accumulation dtype, 2 int32, 3 int64
    sizes: tuple[int, ...]
    zero_fill: bool
    sum_dims: tuple[int, ...]     # () for a scratch buffer
    result_sizes: tuple[int, ...]
    result_order: tuple[int, ...]

    def dtype(self, dtype: torch.dtype, acc: torch.dtype) -> torch.dtype:
        return (dtype, acc, torch.int32, torch.int64)[self.element]

    def allocate(self, dtype: torch.dtype, acc: torch.dtype) -> Guarded:
        """Partial sums: zero-filled (zero_fill) or a sentinel every element must
        overwrite; scratch: NaN (-1 for integers), to be written before it is read."""
        t = self.dtype(dtype, acc)
        if not self.sum_dims:
            return scratch(math.prod(self.sizes), t)
        if self.zero_fill:
            return Guarded(self.sizes, t, 0.0, SENTINEL)
        return guarded_output(self.sizes, t)

    def check(self, g: Guarded, what: str):
        """The guards are intact; a partial-sum buffer not zero-filled was written everywhere."""
        if self.sum_dims and not self.zero_fill:
            assert_written(g, what)
        else:
            g.check_guards(what)

    def reduce(self, partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        r = partial.sum(self.sum_dims)
        if self.result_sizes:
            r = r.view(self.result_sizes).permute(self.result_order)
        return r.to(dtype)


def read_plan(fn, args, count: int) -> list[PlanBuffer]:
    """Calls the driver's plan entry `fn(*args, out)` and decodes its `count` buffers."""
    out = torch.zeros(count * FIELDS, dtype=torch.int64)
    status = fn(*args, out.data_ptr())
    assert status in (None, 0), f"the plan entry failed with {status}"
    plans = []
    for f in out.view(count, FIELDS).tolist():
        element, rank = f[0], f[1]
        sizes = tuple(f[2:2 + rank])
        zero_fill, sum_mask, result_rank = bool(f[7]), f[8], f[9]
        plans.append(PlanBuffer(element, sizes, zero_fill, tuple(d for d in range(rank) if sum_mask >> d & 1),
                                tuple(f[10:10 + result_rank]), tuple(f[15:15 + result_rank])))
    return plans
