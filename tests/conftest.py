"""Shared helpers of the test suite."""

from __future__ import annotations

import os

# No GPU on the test machines: Triton kernels run in Triton's interpreter on
# CPU tensors. This must be set before anything imports triton; a GPU machine
# can run them for real with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import medmtl  # noqa: E402
from medmtl._extension import extension_has_cuda, extension_loaded  # noqa: E402
from tests.ties import kink_between, spaced_normal  # noqa: E402

requires_extension = pytest.mark.skipif(
    not extension_loaded(), reason="medmtl._C is not built (pip install --no-build-isolation -e .)")
requires_cuda_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and extension_has_cuda()),
    reason="needs a CUDA GPU and medmtl._C built with CUDA kernels; none on this machine")


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts and ends with the `auto` backend, and the same global seed."""
    torch.manual_seed(0)
    medmtl.set_backend("auto")
    yield
    medmtl.set_backend("auto")


def make_features(shapes, dtype=torch.float32, layout="contiguous", seed=0, requires_grad=True,
                  device="cpu"):
    """Random levels of the given (B, C, *spatial) shapes.

    The values of a level are distinct and evenly spaced, shuffled
    (tests.ties.spaced_normal): a max never compares two values within
    rounding of each other, so no comparison of gradients depends on a tie.
    layout: "contiguous", "channels_last" or "strided" (a non-contiguous view:
    every other column of a wider tensor).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if layout == "strided":
            wide = spaced_normal((*shape[:-1], 2 * shape[-1]), g, dtype)
            x = wide[..., ::2]
            assert not x.is_contiguous()
        else:
            x = spaced_normal(shape, g, dtype)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        out.append(x.to(device).requires_grad_(requires_grad))
    return out


def make_affine(features, seed=1):
    """Per-level (scale, shift) of the features' dtype, leaves that take gradients.

    Each channel's shift puts the ReLU's kink of x * scale + shift halfway
    between two of its values (tests.ties.kink_between): no value rounds to
    either side of it.
    """
    g = torch.Generator().manual_seed(seed)
    scale = [(torch.rand(x.shape[1], generator=g, dtype=x.dtype) + 0.5) for x in features]
    shift = [kink_between(x, s, g).requires_grad_() for x, s in zip(features, scale)]
    return [s.requires_grad_() for s in scale], shift
