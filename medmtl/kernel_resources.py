"""Registers, shared memory and spills of medmtl's GPU kernels, read without a GPU.

Triton kernels: every configuration a module lists in `aot_kernels()` is compiled
ahead of time for a target (`triton.compile(ASTSource(...), target=GPUTarget("cuda",
cc, 32))`) and the `ptxas -v` report of Triton's own ptxas on its PTX is parsed
(registers, stack frame, spill stores and loads). CUDA kernels: `cuobjdump
-res-usage` (the one Triton ships) on the built extension lists each kernel's
registers, stack frame and shared memory per arch; a stack frame is local memory
(spills, or arrays the compiler could not keep in registers).

Used by the ahead-of-time tests (tests/triton_aot.py, tests/test_gpu_register_budget.py)
and by `medmtl info --kernels`.

An aot_kernels() entry is (name, jit_function, signature, constexprs); its constexprs
may also hold the launch options `num_warps` and `num_stages` (the launchers pass
them), which are compiler options rather than kernel arguments.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

LAUNCH_OPTIONS = ("num_warps", "num_stages")
# Registers per SM and register allocation unit (registers per warp) on sm_80 / sm_90.
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256
MAX_WARPS_PER_SM = {80: 64, 90: 64}
# Shared memory per SM usable by blocks (opt-in maximum per block is a little less).
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """`ptxas -v` output -> {entry function: {registers, stack, spill_stores, spill_loads}}.

    Each entry function's block runs from its "Compiling entry function" line to the
    next one; the first "stack frame" and "Used N registers" lines of a block are its own.
    """
    entries: dict[str, dict[str, int]] = {}
    starts = list(_ENTRY.finditer(log))
    for i, match in enumerate(starts):
        block = log[match.end(): starts[i + 1].start() if i + 1 < len(starts) else len(log)]
        frame, used = _FRAME.search(block), _USED.search(block)
        if frame is None or used is None:
            raise ValueError(f"ptxas report of {match.group(1)} has no register or stack line:\n{block}")
        entries[match.group(1)] = dict(registers=int(used.group(1)), stack=int(frame.group(1)),
                                       spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))
    return entries


def split_launch_options(constexprs: dict) -> tuple[dict, dict]:
    """An aot_kernels() entry's constexprs -> (kernel constexprs, compiler options)."""
    options = {k: constexprs[k] for k in LAUNCH_OPTIONS if k in constexprs}
    return {k: v for k, v in constexprs.items() if k not in LAUNCH_OPTIONS}, options


def compile_triton(fn, signature: dict, constexprs: dict, cc: int, aligned=()):
    """Compiles one aot_kernels() entry for sm_`cc` -> (compiled kernel, resources dict).

    `aligned`: arguments to mark divisible by 16, as the JIT does at a launch where they
    are (16-byte aligned tensors, strides that are multiples of 16): the variant most
    launches compile, whose register allocation differs from the unmarked one's.
    Forces a fresh compilation (a cache hit would skip ptxas and its report). The
    resources: registers, stack, spill_stores, spill_loads (ptxas), shared (bytes,
    Triton's metadata), num_warps, num_stages."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel_constexprs, options = split_launch_options(constexprs)
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=kernel_constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", cc, 32), options=options or None)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    entries = parse_ptxas_log(log.getvalue())
    if len(entries) != 1:
        raise ValueError(f"{fn.__name__}: expected one ptxas entry function, got {sorted(entries)}")
    resources = dict(next(iter(entries.values())), shared=compiled.metadata.shared,
                     num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages)
    return compiled, resources


def blocks_per_sm(registers: int, num_warps: int, shared: int, cc: int) -> int:
    """Resident blocks per SM allowed by registers, warps and shared memory."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = REGISTERS_PER_SM // (per_warp * num_warps)
    by_warps = MAX_WARPS_PER_SM[cc] // num_warps
    by_shared = SHARED_PER_SM[cc] // shared if shared else by_warps
    return min(by_registers, by_warps, by_shared)


# --------------------------------------------------------------------------
# Triton: whole modules, in a subprocess per target

_TRITON_SCRIPT = """
import importlib, json, sys
from medmtl.kernel_resources import compile_triton
module = importlib.import_module(sys.argv[1])
cc = int(sys.argv[2])
rows = []
for name, fn, signature, constexprs in module.aot_kernels():
    _, resources = compile_triton(fn, signature, constexprs, cc)
    rows.append(dict(name=name, kernel=fn.__name__, cc=cc, **resources))
print(json.dumps(rows))
"""

TRITON_MODULES = ("medmtl.kernels.multi_dilation_conv", "medmtl.kernels.multiscale_pool",
                  "medmtl.kernels.spatial_attention", "medmtl.kernels.window_attention")


def _compiler_env() -> dict:
    # Under TRITON_INTERPRET, @triton.jit makes interpreted functions: compile without it.
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def triton_resources(modules=TRITON_MODULES, ccs=(80, 90)) -> list[dict]:
    """Resources of every aot_kernels() configuration of `modules` for each target,
    one compiler subprocess per (module, target), two at a time."""
    jobs = [(m, cc) for m in modules for cc in ccs]
    rows: list[dict] = []
    running: list[tuple[tuple, subprocess.Popen]] = []
    while jobs or running:
        while jobs and len(running) < 2:
            module, cc = jobs.pop(0)
            proc = subprocess.Popen([sys.executable, "-c", _TRITON_SCRIPT, module, str(cc)], env=_compiler_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append(((module, cc), proc))
        (module, cc), proc = running.pop(0)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {module} for sm_{cc} failed:\n{stderr[-2000:]}")
        rows += [dict(row, module=module.rsplit(".", 1)[-1]) for row in json.loads(stdout.strip().splitlines()[-1])]
    return rows


# --------------------------------------------------------------------------
# CUDA: the built extension

_RES_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH = re.compile(r"^arch = sm_(\d+)")


def cuobjdump_path() -> str:
    """Triton's bundled cuobjdump (the CUDA toolkit's when Triton has none)."""
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001  (no triton: look on PATH)
        found = shutil.which("cuobjdump")
        if found is None:
            raise FileNotFoundError("cuobjdump not found (install triton or the CUDA toolkit)") from None
        return found


def parse_res_usage(text: str) -> list[dict]:
    """`cuobjdump -res-usage` output -> [{cc, function (mangled), registers, stack, shared, local}]."""
    rows, cc, function = [], None, None
    for line in text.splitlines():
        if (m := _ARCH.match(line)) is not None:
            cc = int(m.group(1))
        elif (m := _RES_FUNCTION.match(line)) is not None:
            function = m.group(1)
        elif (m := _RES_USAGE.search(line)) is not None and function is not None:
            rows.append(dict(cc=cc, function=function, registers=int(m.group(1)), stack=int(m.group(2)),
                             shared=int(m.group(3)), local=int(m.group(4))))
            function = None
    return rows


def demangle(names: list[str]) -> list[str]:
    """C++ names, shortened to kernel<template args> (mangled ones kept without c++filt)."""
    filt = shutil.which("c++filt")
    if filt is None:
        return list(names)
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    short = []
    for name in out.splitlines():
        name = re.sub(r"^void |medmtl::cuda::|\(anonymous namespace\)::", "", name)
        name = re.sub(r"(\w+)_detail::", r"\1::", name)
        short.append(re.sub(r"\(.*\)$", "", name))                 # the parameter list
    return short


def cuda_resources(library: str | Path | None = None) -> list[dict]:
    """Resources of every kernel in the built extension (medmtl._C by default), per arch."""
    if library is None:
        from medmtl import _extension

        if _extension._C is None:
            raise RuntimeError(f"the extension is not built: {_extension.EXTENSION_ERROR}")
        library = _extension._C.__file__
    text = subprocess.run([cuobjdump_path(), "-res-usage", str(library)], capture_output=True, text=True,
                          check=True).stdout
    rows = parse_res_usage(text)
    for row, name in zip(rows, demangle([r["function"] for r in rows])):
        row["kernel"] = name
    return rows
