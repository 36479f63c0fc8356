"""What this installation of medmtl was built with, and which backends each op can use."""

from __future__ import annotations

import importlib.metadata

import torch

from medmtl._extension import (BUILD_HINT, EXTENSION_ERROR, cpu_capability, cuda_arch_list, extension_has_cuda,
                               extension_loaded, private_op_fallbacks)
from medmtl.ops.flags import get_flags
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
        "winograd (cpu backend's F(4x4, 3x3) tiles; medmtl.set_flags(winograd=...), MEDMTL_WINOGRAD): "
        + {True: "on", False: "off", None: "n/a (no extension)"}[get_flags()["winograd"]],
    ]
    if extension_loaded():
        lines.append(f"CPU kernels: {cpu_capability()}")
        fallbacks = private_op_fallbacks()
        lines.append("private torch ops (oneDNN fused convolutions): " +
                     ("used" if not fallbacks else "not used, the public path instead:"))
        lines += [f"  {reason}" for reason in fallbacks]
    lines.append("")
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


def _table(header: list[str], rows: list[list]) -> list[str]:
    """Aligned text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header)] + [line(r) for r in rows]


def kernels_info(ccs: tuple[int, ...] = (80, 90)) -> str:
    """Registers, shared memory and spills of every GPU kernel, per arch: each Triton
    configuration of aot_kernels() compiled ahead of time (ptxas -v), and the CUDA
    kernels of the built extension (cuobjdump -res-usage). No GPU is needed."""
    from medmtl import kernel_resources as kr

    lines = []
    if triton_error() is not None:
        lines.append(f"Triton kernels: not listed ({triton_error()})")
    else:
        rows = kr.triton_resources(ccs=ccs)
        lines.append("Triton kernels (registers per thread, stack = local memory bytes per thread, "
                     "shared bytes per block, blocks = resident blocks per SM):")
        lines += _table(["configuration", "sm", "warps", "stages", "registers", "spill st/ld", "stack", "shared",
                         "blocks"],
                        [[r["name"], r["cc"], r["num_warps"], r["num_stages"], r["registers"],
                          f"{r['spill_stores']}/{r['spill_loads']}", r["stack"], r["shared"],
                          kr.blocks_per_sm(r["registers"], r["num_warps"], r["shared"], r["cc"])]
                         for r in sorted(rows, key=lambda r: (r["module"], r["name"], r["cc"]))])
    lines.append("")
    if not extension_has_cuda():
        lines.append("CUDA kernels: not built")
    else:
        rows = [r for r in kr.cuda_resources() if r["cc"] in ccs]
        lines.append("CUDA kernels (cuobjdump -res-usage of the built extension; stack > 0 is local memory: "
                     "spills or local arrays):")
        lines += _table(["kernel", "sm", "registers", "stack", "shared"],
                        [[r["kernel"], r["cc"], r["registers"], r["stack"], r["shared"]]
                         for r in sorted(rows, key=lambda r: (r["kernel"], r["cc"]))])
    return "\n".join(lines)
