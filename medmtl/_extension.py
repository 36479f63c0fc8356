"""Loads the compiled extension medmtl._C, which registers the C++/CUDA ops.

medmtl works without it (the reference and, with Triton, the triton backend);
`EXTENSION_ERROR` then says why it is missing.
"""

from __future__ import annotations

try:
    from medmtl import _C  # noqa: F401  (registers torch.ops.medmtl.*)

    EXTENSION_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = str(error)

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make build`) in the medmtl checkout"


def extension_loaded() -> bool:
    return _C is not None


def extension_has_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", 0))


def cuda_arch_list() -> str:
    return getattr(_C, "cuda_arch_list", "") if _C is not None else ""


def private_op_fallbacks() -> list[str]:
    """"op: reason" for each private PyTorch op (oneDNN's fused convolutions) that the
    cpu backend replaces by public ATen calls, its schema differing from the one
    medmtl was written for (csrc/cpu/private_ops.h); empty when all are used."""
    return list(_C.private_op_fallbacks()) if _C is not None else []


def cpu_capability() -> str:
    """The CPU kernels' copy in force ("default", "avx2" or "avx512"; csrc/cpu/cpu_capability.h),
    the best this CPU supports, and why they differ (or what was ignored); "" when not built."""
    if _C is None:
        return ""
    note = _C.cpu_capability_note or "MEDMTL_CPU_CAPABILITY=default|avx2|avx512 forces a lower one"
    return f"{_C.cpu_capability} (this CPU supports {_C.cpu_capability_supported}; {note})"
