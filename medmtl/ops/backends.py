"""Backend choice for medmtl's ops.

Every op has the backends `reference` (plain PyTorch, the oracle), `cpu` (C++),
`cuda` (CUDA C++) and `triton`. `auto` (the default) takes, for CPU tensors,
`cpu` when the extension is built and `reference` otherwise; for CUDA tensors,
the first available of the op's entry in `GPU_PREFERENCE`, else `reference`.
`cuda` is available only on a device the extension has code for (SASS of the
device's major version at or below its minor, or PTX at or below its
capability, which the driver compiles); where `auto` passes over a preferred
backend on a GPU it warns once per op and device, naming the reason.

Choose with `medmtl.set_backend(name)`, `with medmtl.backend(name): ...` or
the environment variable MEDMTL_BACKEND (read at import). `set_backend` and
the variable set the process-wide choice; `with medmtl.backend(...)` overrides
it for the current thread only, until the block ends (so two threads nesting
it never leave each other's choice in force). torch.compile guards on both
(a module global and an attribute of a module-level threading.local), so a
compiled function recompiles when the choice in force changes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Iterator

import torch

from medmtl._extension import BUILD_HINT, EXTENSION_ERROR, cuda_arch_list, extension_has_cuda, extension_loaded

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
KERNEL_BACKENDS = ("reference", "cpu", "cuda", "triton")

# Which GPU backend `auto` takes first, per op. No GPU has been lent to this
# project yet, so these orders are not measured: the CUDA kernels come first
# (for multiscale_pool they make one pass where the Triton ones make one per
# output size; for the others there is no reason yet to prefer either).
GPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "multiscale_pool": ("cuda", "triton"),
    "multi_dilation_conv": ("cuda", "triton"),
    "spatial_attention": ("cuda", "triton"),
    "window_attention": ("cuda", "triton"),
}

# Ops and the backends each implements, filled by the op modules.
OPS: dict[str, tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


_process_backend: str = _check_name(os.environ.get("MEDMTL_BACKEND", "auto"), "MEDMTL_BACKEND")

# The innermost `with backend(...)` of each thread (attribute `name`; absent or
# None outside any block), which takes precedence over _process_backend.
_scoped = threading.local()


def get_backend() -> str:
    """The backend name in force in this thread (`auto` unless one was set)."""
    scoped = getattr(_scoped, "name", None)
    return _process_backend if scoped is None else scoped


def set_backend(name: str) -> None:
    """Sets the backend for every op in every thread: one of auto, reference, cpu, cuda, triton.

    Inside a `with medmtl.backend(...)` block the block's choice stays in force
    in its thread until the block ends.
    """
    global _process_backend
    _process_backend = _check_name(name, "backend")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """`with medmtl.backend("cpu"): ...` runs the block with that backend, in this thread only."""
    chosen = _check_name(name, "backend")
    previous = getattr(_scoped, "name", None)
    _scoped.name = chosen
    try:
        yield
    finally:
        _scoped.name = previous


def register_op(name: str, backends: tuple[str, ...]) -> None:
    OPS[name] = backends


def triton_error() -> str | None:
    """Why the triton backend cannot run, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, or pip install 'medmtl[triton]')"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def arch_mismatch(capability: tuple[int, int], arch_list: str) -> str | None:
    """Why CUDA code built for `arch_list` (TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0+PTX") has no
    kernel image for a device of compute `capability` (major, minor), or None if it has one.

    SASS for X.Y runs on X.Z with Z >= Y ("a" variants, e.g. 9.0a, only on X.Y); PTX for
    X.Y is compiled by the driver for any capability >= X.Y."""
    major, minor = capability
    for entry in arch_list.replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        version = entry[:-4] if ptx else entry
        specific = version.endswith("a")
        try:
            x, y = (int(v) for v in version.rstrip("a").split("."))
        except ValueError:
            continue
        if x == major and (y == minor if specific else y <= minor):
            return None
        if ptx and (x, y) <= (major, minor):
            return None
    return (f"medmtl._C has CUDA code for {arch_list or 'no arch'} only, none that runs on compute capability "
            f"{major}.{minor} (no kernel image); rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" "
            f"(or add +PTX to an arch at or below it)")


def unavailable_reason(op: str, name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run op `op` on tensors of `device`, or None if it can."""
    if name not in OPS.get(op, ()):
        return f"op {op!r} has no {name!r} backend (it has {', '.join(OPS.get(op, ()))})"
    if name == "reference":
        return None
    if name == "cpu":
        if not extension_loaded():
            return f"the C++ extension medmtl._C is not built ({EXTENSION_ERROR}); {BUILD_HINT}"
        if device.type != "cpu":
            return f"backend 'cpu' runs CPU tensors, got tensors on {device}"
        return None
    if name == "cuda":
        if not extension_loaded():
            return f"the C++ extension medmtl._C is not built ({EXTENSION_ERROR}); {BUILD_HINT}"
        if not extension_has_cuda():
            return ("medmtl._C was built without CUDA kernels; rebuild with a CUDA build of torch, "
                    "nvcc on PATH (or CUDA_HOME set) and MEDMTL_BUILD_CUDA=1")
        if not torch.cuda.is_available():
            return "no CUDA GPU is available (torch.cuda.is_available() is False)"
        if device.type != "cuda":
            return f"backend 'cuda' runs CUDA tensors, got tensors on {device}"
        return arch_mismatch(torch.cuda.get_device_capability(device), cuda_arch_list())
    if name == "triton":
        reason = triton_error()
        if reason is not None:
            return reason
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA GPU is available (torch.cuda.is_available() is False)"
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (f"backend 'triton' runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, set "
                f"before triton is imported), got tensors on {device}")
    return f"unknown backend {name!r}"


_WARNED: set[tuple[str, str]] = set()


def _warn_fallback(op: str, device: torch.device, passed: list[tuple[str, str]], taken: str) -> None:
    """One warning per (op, device) when `auto` passes over preferred GPU backends."""
    key = (op, str(device))
    if not passed or key in _WARNED:
        return
    _WARNED.add(key)
    reasons = "; ".join(f"{name}: {reason}" for name, reason in passed)
    warnings.warn(f"medmtl: {op} on {device} runs on backend {taken!r}, not {passed[0][0]!r} ({reasons})",
                  RuntimeWarning, stacklevel=3)


def resolve_backend(op: str, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device` under the current choice.

    Raises BackendUnavailableError when the chosen backend cannot run it.
    """
    name = get_backend()
    if name == "auto":
        if device.type == "cpu":
            return "cpu" if unavailable_reason(op, "cpu", device) is None else "reference"
        if device.type == "cuda":
            passed = []
            for candidate in GPU_PREFERENCE.get(op, ()):
                reason = unavailable_reason(op, candidate, device)
                if reason is None:
                    _warn_fallback(op, device, passed, candidate)
                    return candidate
                passed.append((candidate, reason))
            _warn_fallback(op, device, passed, "reference")
        return "reference"
    reason = unavailable_reason(op, name, device)
    if reason is not None:
        raise BackendUnavailableError(f"medmtl backend {name!r} cannot run {op}: {reason}")
    return name
