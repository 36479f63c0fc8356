"""Guarded buffers for the kernels run on the CPU emulation (the *_cuda_emulated tests).

Buffers handed to the kernels sit between guard zones of GUARD elements:
writes outside the outputs are reported (check_guards), reads outside the
inputs see NaN (poison; -1 for integer buffers), outputs start out filled with
a sentinel that must be overwritten (assert_written), and scratch the kernels
must write before they read is NaN inside and around.
"""

from __future__ import annotations

import math

import torch

GUARD = 64              # elements of guard zone on each side of a buffer
SENTINEL = -12288.0     # initial value of the outputs (exact in every dtype)
INT_SENTINEL = -7       # initial value of int64 outputs (argmax scratch)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class Guarded:
    """A flat buffer with guard zones of `fill` on each side; `.t` is the tensor in between."""

    def __init__(self, shape, dtype, value, fill):
        shape = tuple(shape)
        n = math.prod(shape)
        self.n, self.fill = n, fill
        self.buf = torch.full((n + 2 * GUARD,), fill, dtype=dtype)
        self.t = self.buf[GUARD:GUARD + n].view(shape)
        if isinstance(value, torch.Tensor):
            self.t.copy_(value.reshape(shape))
        else:
            self.t.fill_(value)

    def ptr(self, offset: int = 0) -> int:
        """The address of element `offset` of `.t`."""
        return self.t.data_ptr() + offset * self.t.element_size()

    def check_guards(self, what: str):
        expected = _bits(torch.full((GUARD,), self.fill, dtype=self.buf.dtype))
        for zone, side in ((self.buf[:GUARD], "before"), (self.buf[GUARD + self.n:], "after")):
            assert torch.equal(_bits(zone), expected), f"the kernels wrote {side} {what}"


def guarded_input(t: torch.Tensor) -> Guarded:
    return Guarded(t.shape, t.dtype, t.contiguous(), float("nan") if t.is_floating_point() else -1)


def guarded_output(shape, dtype) -> Guarded:
    fill = INT_SENTINEL if dtype == torch.int64 else SENTINEL
    return Guarded(shape, dtype, fill, fill)


def scratch(n: int, dtype) -> Guarded:
    """Scratch the kernels must write before they read: NaN (-1 for integers) inside and around."""
    fill = float("nan") if dtype.is_floating_point else -1
    return Guarded((n,), dtype, fill, fill)


def assert_written(g: Guarded, what: str):
    """The guards are intact and no element still holds SENTINEL."""
    g.check_guards(what)
    if g.n:
        stale = _bits(g.t.reshape(-1)) == _bits(torch.tensor([SENTINEL], dtype=g.t.dtype))
        assert not stale.any(), f"{what}: {int(stale.sum())} of {g.n} elements never written"


def assert_unchanged(g: Guarded, original: torch.Tensor, what: str):
    g.check_guards(what)
    assert torch.equal(_bits(g.t.reshape(-1)), _bits(original.contiguous().reshape(-1))), f"the kernels wrote {what}"


def ptr_or_none(g: Guarded | None) -> int | None:
    """The buffer's address, or None (nullptr) for an absent or empty one."""
    return g.ptr() if g is not None and g.n else None
