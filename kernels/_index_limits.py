"""The int32 index range of the Triton kernels, checked by their launchers.

The kernels compute offsets within one sample (one batch item, or one plane)
in int32 and only the batch or plane offset in int64 (each module's docstring
says which), so a tensor whose sample spans 2^31 elements or more would wrap
around and read or write out of bounds. The launchers call check_int32_span
first and raise instead. INT32_LIMIT is a module global so that tests can
lower it rather than allocate 8 GB.
"""

from __future__ import annotations

import torch

INT32_LIMIT = 2**31


def sample_span(t: torch.Tensor, batch_dims: int = 1) -> int:
    """Elements one sample of t spans in memory: 1 + the largest offset of an element
    of t[0] (the first batch_dims dims indexed away), at least its element count."""
    shape, stride = t.shape[batch_dims:], t.stride()[batch_dims:]
    count = 1
    for n in shape:
        count *= n
    if count == 0:
        return 0
    return max(count, 1 + sum((n - 1) * abs(s) for n, s in zip(shape, stride)))


def check_int32_span(where: str, name: str, elements: int, what: str = "per sample") -> None:
    """Raises ValueError naming `name` when `elements` (of one sample, plane, ...) do not fit int32."""
    if elements >= INT32_LIMIT:
        raise ValueError(
            f"{where}: {name} spans {elements} elements {what}; the triton backend indexes them in int32 "
            f"and takes fewer than {INT32_LIMIT} (split the batch or the map, or use the cpu, cuda or "
            f"reference backend)")
