"""Ahead-of-time compilation of a Triton kernel module for sm_80 and sm_90,
shared by the tests of every Triton module (no GPU needed).

The compiler runs in subprocesses, one per target, without TRITON_INTERPRET
(under it @triton.jit makes interpreted functions) and each with a fresh
cache. `start` launches them (a test module can start them early, so they run
while its interpreter tests do); `check` waits and asserts that every entry of
the module's aot_kernels() compiled to a cubin within the target's shared
memory, with no register spills (ptxas -v of Triton's own ptxas, parsed by
medmtl.kernel_resources) and the hot kernels within their register budget,
that aot_kernels() covers every public kernel, and that every kernel also
compiles with its int arguments specialised to 1, as the JIT does; the hot
kernels also compile, on sm_90, with their pointers (and the module's
AOT_ALIGNED_ARGS) marked divisible by 16, the variant most launches get.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from medmtl.kernel_resources import blocks_per_sm

# Shared memory per block (opt-in maximum) of each target.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Registers per thread of the hot kernels (docs/gpu_expectations.md): at most 128,
# so that four 4-warp blocks (or two 8-warp ones) fit an SM. Where a kernel needs
# more, its module's REGISTER_BUDGET_EXCEPTIONS names the configurations, and they
# must still leave MIN_BLOCKS_PER_SM blocks resident (the arithmetic is in the doc).
HOT_KERNELS = ("window_attention_forward_kernel", "window_attention_backward_dq_kernel",
               "window_attention_backward_dkv_kernel", "multi_dilation_conv_forward_kernel")
REGISTER_BUDGET = 128
MIN_BLOCKS_PER_SM = 2

_SCRIPT = """
import importlib, json, sys
from triton.runtime.jit import JITFunction
from medmtl.kernel_resources import compile_triton

module = importlib.import_module(sys.argv[1])
cc = int(sys.argv[2])
kernels = sorted(n for n, v in vars(module).items() if isinstance(v, JITFunction) and not n.startswith("_"))
results = []
for name, fn, signature, constexprs in module.aot_kernels():
    compiled, resources = compile_triton(fn, signature, constexprs, cc)
    results.append(dict(name=name, kernel=fn.__name__, cubin=len(compiled.asm.get("cubin", b"")), **resources))
# At launch, the JIT turns int arguments equal to 1 into constexprs (D = 1 on 2-D
# levels, B = 1, relu = 1, ...): compile each kernel once with all of them so.
specialised = []
for name, fn, signature, constexprs in module.aot_kernels():
    if fn.__name__ in specialised or "_fp32" not in name:
        continue
    ones = [arg for arg, ty in signature.items() if ty == "i32"]
    compiled, resources = compile_triton(fn, {**signature, **{a: "constexpr" for a in ones}},
                                         {**constexprs, **{a: 1 for a in ones}}, cc)
    assert compiled.asm["cubin"], name
    results.append(dict(name=name + "_ones", kernel=fn.__name__, cubin=len(compiled.asm["cubin"]), **resources))
    specialised.append(fn.__name__)
# Most launches mark pointers and strides divisible by 16 (aligned tensors, channel counts
# of 16s): the hot kernels also compile so on sm_90, the GPU they are tuned for.
hot = json.loads(sys.argv[3])
for name, fn, signature, constexprs in module.aot_kernels() if cc == 90 else ():
    if fn.__name__ not in hot:
        continue
    aligned = [a for a, ty in signature.items()
               if ty.startswith("*") or a in getattr(module, "AOT_ALIGNED_ARGS", ())]
    compiled, resources = compile_triton(fn, signature, constexprs, cc, aligned)
    results.append(dict(name=name + "_aligned", kernel=fn.__name__, cubin=len(compiled.asm["cubin"]), **resources))
print(json.dumps(dict(kernels=kernels, results=results, specialised=specialised)))
"""


def start(module_name: str, tmp_path: Path) -> dict[int, subprocess.Popen]:
    """Starts one compiler subprocess per target for the Triton module `module_name`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for cc in SHARED_LIMIT:
        env_cc = dict(env, TRITON_CACHE_DIR=str(Path(tmp_path) / f"cache_sm{cc}"))
        argv = [sys.executable, "-c", _SCRIPT, module_name, str(cc), json.dumps(HOT_KERNELS)]
        procs[cc] = subprocess.Popen(argv, cwd=tmp_path, env=env_cc, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
    return procs


def check(procs: dict[int, subprocess.Popen], module) -> None:
    """Waits for the compilers and asserts their results (see the module docstring)."""
    names = [entry[0] for entry in module.aot_kernels()]
    assert len(names) == len(set(names)), "aot_kernels() names must be unique"
    for cc, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"AOT compile for sm_{cc} failed:\n{stderr[-4000:]}"
        report = json.loads(stdout.strip().splitlines()[-1])
        results = report["results"]
        assert [r["name"] for r in results if not r["name"].endswith(("_ones", "_aligned"))] == names
        assert {r["kernel"] for r in results} == set(report["kernels"]), "a kernel is not AOT-compiled"
        assert sorted(report["specialised"]) == report["kernels"]
        exceptions = getattr(module, "REGISTER_BUDGET_EXCEPTIONS", frozenset())
        for r in results:
            assert r["cubin"] > 0, f"{r['name']}: no cubin for sm_{cc}"
            assert r["shared"] <= SHARED_LIMIT[cc], f"{r['name']}: {r['shared']} B shared memory on sm_{cc}"
            check_resources(r, cc, exceptions)


def check_resources(r: dict, cc: int, exceptions: frozenset) -> None:
    """One compiled configuration: no spills (nor any stack frame: local memory), and a hot
    kernel within REGISTER_BUDGET, or listed in its module's REGISTER_BUDGET_EXCEPTIONS
    and still MIN_BLOCKS_PER_SM blocks per SM."""
    where = f"{r['name']} on sm_{cc} ({r['registers']} registers, {r['num_warps']} warps)"
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, \
        f"{where} spills: {r['spill_stores']} B stored, {r['spill_loads']} B loaded per thread"
    assert r["stack"] == 0, f"{where} has a {r['stack']} B stack frame (local memory)"
    if r["kernel"] not in HOT_KERNELS or r["registers"] <= REGISTER_BUDGET:
        return
    base = r["name"].removesuffix("_ones").removesuffix("_aligned")
    assert base in exceptions, f"{where}: over the hot-kernel budget of {REGISTER_BUDGET} registers"
    blocks = blocks_per_sm(r["registers"], r["num_warps"], r["shared"], cc)
    assert blocks >= MIN_BLOCKS_PER_SM, f"{where}: {blocks} block(s) per SM, fewer than {MIN_BLOCKS_PER_SM}"


def stop(procs: dict[int, subprocess.Popen]) -> None:
    """Kills compilers still running (a module's end when its check did not run)."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


_TRITON_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int32": "i32"}


def record_launches(monkeypatch, module, kernel_names) -> set:
    """Wraps the module's kernels so that every launch adds (kernel, constexprs, pointer
    dtypes) to the returned set; run the launchers afterwards to fill it."""
    import torch

    launched: set = set()

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                pointers = tuple(sorted((name, "*" + _TRITON_TYPE[str(a.dtype).removeprefix("torch.")])
                                        for name, a in zip(self.fn.arg_names, args) if isinstance(a, torch.Tensor)))
                launched.add((self.fn.__name__, tuple(sorted(constexprs.items(), key=str)), pointers))
                return self.fn[grid](*args, **constexprs)
            return launch

    for name in kernel_names:
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    return launched


def check_covers(module, launched: set) -> None:
    """aot_kernels() lists exactly the launch configurations recorded, once each."""
    entries = module.aot_kernels()
    listed = set()
    for _, fn, signature, constexprs in entries:
        fn = getattr(fn, "fn", fn)  # a kernel record_launches wrapped
        pointers = tuple(sorted((k, v) for k, v in signature.items() if v.startswith("*")))
        listed.add((fn.__name__, tuple(sorted(constexprs.items(), key=str)), pointers))
    assert len(listed) == len(entries), "aot_kernels() has duplicate configurations"
    missing = launched - listed
    assert not missing, f"launch configurations missing from aot_kernels(): {sorted(missing, key=str)}"
    unused = listed - launched
    assert not unused, f"aot_kernels() lists configurations no launch used: {sorted(unused, key=str)}"


def early_compilers(request, tmp_path_factory, module_name: str, test_name: str = "test_aot_compile_sm80_sm90"):
    """Body of a module-scoped autouse fixture: starts the compilers with the test
    module's first test when `test_name` is selected (so they run while the
    interpreter tests do), yields them (None when not selected), and kills them
    at the module's end if still running."""
    selected = any(getattr(item, "module", None) is request.module and item.originalname == test_name
                   for item in request.session.items)
    if not selected:
        yield None
        return
    procs = start(module_name, tmp_path_factory.mktemp("aot_" + module_name.rsplit(".", 1)[-1]))
    yield procs
    stop(procs)
