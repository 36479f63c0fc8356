"""Register and spill checks of the GPU kernels, without a GPU.

The Triton kernels are checked where they are compiled ahead of time, in each
Triton test module's test_aot_compile_sm80_sm90 (tests/triton_aot.py: no spill
and no stack frame on sm_80 and sm_90, hot kernels within their register budget).
Here: that the ptxas report those checks read does see a spill (a kernel made to
spill is reported as spilling, the same kernel on a small block is not), and the
CUDA kernels of the built extension (cuobjdump -res-usage: no stack frame, the
hot kernels within 128 registers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from medmtl import kernel_resources as kr
from medmtl._extension import extension_has_cuda
from tests.triton_aot import REGISTER_BUDGET

_SPILLER = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def scale_by_sum(x_ptr, y_ptr, BLOCK: tl.constexpr):
        """Every element stays live until the sum is known: BLOCK / threads registers each (the
        first store may overwrite x, so x cannot be loaded again for the product)."""
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i)
        tl.store(y_ptr + i, x + 1.0)
        tl.store(y_ptr + i, x * tl.sum(x, 0))
''')

_COMPILE = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import spiller
    from medmtl.kernel_resources import compile_triton
    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}
    out = {}
    for block in (128, 16384):
        _, out[block] = compile_triton(spiller.scale_by_sum, signature, {"BLOCK": block, "num_warps": 1}, 90)
    print(json.dumps(out))
''')


def test_ptxas_report_sees_spills(tmp_path):
    """16384 float32 values on one warp (512 per thread) must spill; 128 (4 per thread) must not."""
    (tmp_path / "spiller.py").write_text(_SPILLER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    small, large = report["128"], report["16384"]
    assert small["spill_stores"] == 0 and small["stack"] == 0 and small["registers"] < 64
    assert large["spill_stores"] > 0 and large["spill_loads"] > 0 and large["stack"] > 0
    assert small["num_warps"] == large["num_warps"] == 1


def test_blocks_per_sm_arithmetic():
    # 4 warps: 128 registers -> 4 blocks, 168 -> 3, 255 -> 2; shared memory limits too.
    assert [kr.blocks_per_sm(r, 4, 0, 90) for r in (128, 168, 255)] == [4, 3, 2]
    assert kr.blocks_per_sm(128, 8, 0, 90) == 2
    assert kr.blocks_per_sm(32, 4, 100 * 1024, 90) == 2
    assert kr.blocks_per_sm(32, 4, 100 * 1024, 80) == 1


# No CUDA kernel may have a stack frame (their index math is 32-bit: a 64-bit division is
# a subroutine call, and the values live across it went to the stack). Hot kernels allowed
# above the 128-register budget (name as demangled -> {arch: most registers}), with the
# occupancy arithmetic in docs/gpu_expectations.md:
#  - the window attention backward holds a 32 x 32 score tile (S and dP) and the key tile's
#    dK, dV in registers: 128 on sm_80, 206 - 214 on sm_90 (2 blocks per SM; ptxas made to
#    keep 3 or 4 spills 64 - 216 B);
#  - the float64 forward (two registers per value) keeps 3 blocks per SM on sm_90: <= 168.
_WA_FORWARD = "window_attention::window_attention_forward_kernel"
_WA_BACKWARD = "window_attention::window_attention_backward_kernel"
CUDA_REGISTER_EXCEPTIONS = {
    **{f"{_WA_BACKWARD}<{t}>": {90: 255} for t in ("float", "double", "__half", "__nv_bfloat16")},
    f"{_WA_FORWARD}<double>": {90: 168},
}
CUDA_HOT_KERNELS = (_WA_FORWARD, _WA_BACKWARD, "multi_dilation_conv::dilated_taps_conv_kernel")


@pytest.mark.skipif(not extension_has_cuda(), reason="the extension was built without CUDA kernels")
def test_cuda_kernels_have_no_stack_frame_and_hot_ones_fit_the_budget():
    rows = kr.cuda_resources()
    assert {r["cc"] for r in rows} >= {80, 90}, "the extension lacks sm_80 or sm_90 code"
    assert any(r["kernel"].startswith(CUDA_HOT_KERNELS[0]) for r in rows), "kernel names not demangled"
    problems = []
    for r in rows:
        base = r["kernel"].split("<")[0]
        where = f"{r['kernel']} sm_{r['cc']}"
        if r["stack"] > 0:
            problems.append(f"{where}: {r['stack']} B stack frame")
        budget = CUDA_REGISTER_EXCEPTIONS.get(r["kernel"], {}).get(r["cc"], REGISTER_BUDGET)
        if base in CUDA_HOT_KERNELS and r["registers"] > budget:
            problems.append(f"{where}: {r['registers']} registers (at most {budget})")
    assert not problems, "\n".join(problems)


def test_info_kernels_lists_each_configuration(monkeypatch, capsys):
    """`medmtl info --kernels` prints one row per configuration and arch (resources faked:
    the real ones compile for minutes; the tests above and tests/triton_aot.py read them)."""
    from medmtl import cli

    rows = [dict(module="m", name="k_fp16", kernel="k", cc=cc, registers=regs, stack=0, spill_stores=0,
                 spill_loads=0, shared=4096, num_warps=4, num_stages=1) for cc, regs in ((80, 96), (90, 200))]
    monkeypatch.setattr(kr, "triton_resources", lambda ccs: [r for r in rows if r["cc"] in ccs])
    monkeypatch.setattr(kr, "cuda_resources", lambda: [dict(cc=90, kernel="conv<float>", registers=64, stack=8,
                                                            shared=1024, local=0, function="x")])
    assert cli.main(["info", "--kernels", "--arch", "90"]) == 0
    out = capsys.readouterr().out
    triton_rows = [line.split() for line in out.splitlines() if line.startswith("k_fp16")]
    assert triton_rows == [["k_fp16", "90", "4", "1", "200", "0/0", "0", "4096", "2"]]
    if extension_has_cuda():
        assert ["conv<float>", "90", "64", "8", "1024"] in [line.split() for line in out.splitlines()]
