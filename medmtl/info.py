"""What this installation of medmtl was built with, and which backends each op can use."""

from __future__ import annotations

import importlib.metadata

import torch

from medmtl._extension import BUILD_HINT, EXTENSION_ERROR, cuda_arch_list, extension_has_cuda, extension_loaded
from medmtl.ops.backends import KERNEL_BACKENDS, OPS, get_backend, resolve_backend, triton_error, unavailable_reason


def _triton_version() -> str:
    reason = triton_error()
    if reason is not None:
        return f"no ({reason})"
    return importlib.metadata.version("triton")


def info() -> str:
    """A report of the build (extension, CUDA arches, Triton) and each op's backends."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    lines = [
        f"medmtl {importlib.metadata.version('medmtl')}  torch {torch.__version__}",
        "extension medmtl._C: " + ("yes" if extension_loaded() else f"no ({EXTENSION_ERROR}; {BUILD_HINT})"),
        "CUDA kernels: " + (f"yes, arches {cuda_arch_list()}" if extension_has_cuda() else "no"),
        f"GPU available: {'yes, ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}",
        f"triton: {_triton_version()}",
        f"backend in force: {get_backend()}",
        "",
    ]
    width = max([len(op) for op in OPS] + [len("op")])
    lines.append(f"{'op':{width}} {'backend':10} available here")
    for op, backends in sorted(OPS.items()):
        for name in KERNEL_BACKENDS:
            if name not in backends:
                status = "not implemented"
            else:
                reasons = [unavailable_reason(op, name, d) for d in (cpu, cuda)]
                status = "yes" if None in reasons else "no: " + reasons[0 if name != "cuda" else 1]
            lines.append(f"{op:{width}} {name:10} {status}")
        auto = resolve_backend(op, cpu) if get_backend() == "auto" else get_backend()
        lines.append(f"{op:{width}} {'auto (CPU)':10} -> {auto}")
    return "\n".join(lines)
