"""Comparisons that cannot depend on a ReLU or max tie.

Two implementations of the same float32 sum round differently (oneDNN and MKL
pick their summation order for the processor at hand). Where the exact
pre-activation of a ReLU lies within that rounding of zero, one
implementation passes the gradient and the other does not, and the whole
gradient of that output differs; where two candidates of a max lie within
it, the gradient goes to different positions. Such a test passes on one
machine and fails on another. The suite keeps away from ties in one of three
ways, each chosen where it is used:

- `zero_ties`: the upstream gradient is zeroed at the outputs whose float64
  pre-activation lies within the comparison's tolerance of zero. Every other
  output still checks the ReLU mask, forward and backward (at the zeroed
  outputs the forward values agree within the tolerance anyway: ReLU is
  continuous).
- `spaced_normal`: inputs drawn as distinct values, evenly spaced far above
  float32 rounding and none near zero, so a max compares values that differ
  clearly, and `kink_between` puts a ReLU's kink (for a shift) halfway
  between two of them.
- `tie_margin` / `tie_free_seed`: for a composite module (BatchNorm, ReLUs
  and maxima inside), the seed of the inputs is chosen so that a float64 run
  of the plain module keeps every ReLU input and every max's runner-up at
  least a given fraction of the tensor's scale away from the tie.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode


def zero_ties(grad_output: torch.Tensor, pre_activation: torch.Tensor, band: float) -> torch.Tensor:
    """grad_output with zeros where |pre_activation| <= band.

    pre_activation: the exact (float64) input of the ReLU, of grad_output's shape.
    band: an absolute distance from zero, the comparison's tolerance on that tensor.
    """
    if pre_activation.shape != grad_output.shape:
        raise ValueError(f"pre_activation must have grad_output's shape {tuple(grad_output.shape)}, "
                         f"got {tuple(pre_activation.shape)}")
    ties = pre_activation.detach().abs() <= band
    return grad_output.masked_fill(ties.to(grad_output.device), 0)


def spaced_normal(shape, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """A tensor of distinct values with about unit spread, in random order.

    The values are an evenly spaced grid, symmetric about zero and without it
    ((k + 1/2) * step for k in [-n/2, n/2)), shuffled: any two differ by at
    least `step` and none lies within step / 2 of zero, where step ~ 3.5 / n
    is far above float32 rounding for the tensors tests use (n < 10^5).
    """
    n = math.prod(shape)
    step = math.sqrt(12.0) / max(n, 1)  # the grid spans [-sqrt(3), sqrt(3)]: unit variance
    grid = (torch.arange(n, dtype=torch.float64) - n / 2 + 0.5) * step
    return grid[torch.randperm(n, generator=generator)].reshape(shape).to(dtype)


def kink_between(x: torch.Tensor, scale: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A per-channel shift that puts relu(x * scale + shift)'s kink halfway
    between two neighbouring values of each channel of x.

    x: (B, C, *spatial); scale: (C,) (nonzero). Returns (C,) of x's dtype, each
    shift -scale * m with m the midpoint of two neighbouring values of that
    channel, near its median.
    """
    values = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1).sort(dim=1).values
    count = values.shape[1]
    if count < 2:
        return torch.zeros(x.shape[1], dtype=x.dtype)
    # a neighbouring pair around the middle half of each channel's values
    lo = count // 4
    idx = lo + torch.randint(0, max(count // 2, 1), (x.shape[1],), generator=generator)
    idx = idx.clamp(max=count - 2)
    rows = torch.arange(x.shape[1])
    mid = (values[rows, idx] + values[rows, idx + 1]) / 2
    return (-scale.detach().double() * mid).to(x.dtype)


_RELUS = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.Tensor.relu, torch.Tensor.relu_}
_MAXES = {torch.max, torch.Tensor.max, torch.amax, torch.Tensor.amax}


class _TieMargins(TorchFunctionMode):
    """Records the smallest distance to a tie of every ReLU and max reduction
    it sees, relative to the scale (max |value|) of the tensor reduced."""

    def __init__(self):
        super().__init__()
        self.margin = math.inf

    def _note(self, distance: torch.Tensor, values: torch.Tensor) -> None:
        if distance.numel() == 0:
            return
        scale = values.detach().abs().max().item()
        if scale > 0:
            self.margin = min(self.margin, distance.min().item() / scale)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _RELUS:
            self._note(args[0].detach().abs(), args[0])
        elif func in _MAXES and isinstance(args[0], torch.Tensor):
            dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
            if isinstance(dim, (int, tuple, list)):
                dims = [dim] if isinstance(dim, int) else list(dim)
                z = args[0].detach()
                flat = z.movedim(dims, list(range(-len(dims), 0))).flatten(-len(dims))
                if flat.shape[-1] >= 2:
                    top = flat.topk(2, dim=-1).values
                    gap = top[..., 0] - top[..., 1]
                    # exact ties are the implementations' shared convention, not a rounding flip
                    self._note(gap[gap > 0], z)
        elif func in (torch.nn.functional.max_pool2d, torch.nn.functional.adaptive_max_pool2d,
                      torch.nn.functional.adaptive_max_pool3d):
            raise NotImplementedError(f"tie_margin does not measure {func.__name__}")
        return out


def tie_margin(fn: Callable, *args, **kwargs) -> float:
    """The smallest relative distance to a tie over every ReLU and max (with a
    dim) that fn(*args, **kwargs) computes: |x| / max|x| for a ReLU's input x,
    (largest - runner-up) / max|x| for a max. Run it in float64."""
    with _TieMargins() as recorder:
        fn(*args, **kwargs)
    return recorder.margin


def tie_free_seed(margin_of_seed: Callable[[int], float], band: float, tries: int = 200) -> int:
    """The first seed s (from 0) with margin_of_seed(s) > band."""
    for seed in range(tries):
        if margin_of_seed(seed) > band:
            return seed
    raise AssertionError(f"no seed below {tries} keeps every ReLU and max {band} of its scale from a tie")
