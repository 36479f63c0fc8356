"""The CUDA kernels of multi_dilation_conv and spatial_attention, run on the CPU.

Without a GPU, this module compiles copies of
csrc/cuda/multi_dilation_conv_kernel.cu and csrc/cuda/spatial_attention_kernel.cu
with g++ against the emulation of tests/cuda_emulation/cuda_emu.h (threads as
fibers, blocks one after another; see that file for what is and is not
emulated), calls the launchers through tests/cuda_emulation/driver_dilated_attention.cpp
and ctypes the way the torch wrappers csrc/cuda/*_cuda.cpp do, and compares
forward and every gradient with the reference ops (medmtl.ops.reference,
differentiated by autograd in float64). Two builds: the kernels as they are,
and a "small limits" one with tiny tiles, chunks, grids and tap lists, so that
the multi-tile, multi-chunk, grid-stride and multi-launch paths run on small
inputs.

Buffers handed to the kernels sit between guard zones: writes outside the
outputs are reported, reads outside the inputs (and of scratch before it is
written) see NaN, outputs start out filled with a sentinel that must be
overwritten. The build and the guarded buffers are shared with the other
*_cuda_emulated tests (tests/cuda_emulation_build.py,
tests/cuda_emulation_buffers.py).
"""

from __future__ import annotations

import ctypes
import zlib
from dataclasses import dataclass

import pytest
import torch

from medmtl.ops import reference
from tests.cuda_emulation_buffers import assert_unchanged, assert_written, guarded_input, guarded_output, ptr_or_none
from tests.cuda_emulation_build import ACC_DTYPE, DTYPE_CODE, EmulatedLibrary, build_emulations
from tests.cuda_emulation_plan import read_plan

KERNELS = ("multi_dilation_conv_kernel", "spatial_attention_kernel")
# Included by the kernels (acc_type, to_acc) and the driver (the wrappers' launch plans).
HEADERS = ("multiscale_pool_kernel.h", "device_common.cuh", "launch_plan.h")

# The "small limits" build: per kernel file, constant -> value.
SMALL_LIMITS = {
    "multi_dilation_conv_kernel.cu": {
        "kTileH": 4, "kTileW": 8, "kOutTile": 3, "kRedChunk": 2, "kWeightTileOut": 4, "kWeightTileIn": 8,
        "kPixelChunk": 5, "kBiasThreads": 32, "kMaxTapsPerLaunch": 9, "kMaxGridX": 2, "kMaxGridY": 3,
        "kTargetBlocks": 64,
    },
    "spatial_attention_kernel.cu": {
        "kPoolSlices": 3, "kPixelThreads": 32, "kWeightThreads": 32, "kMaxGridX": 2, "kMaxGridY": 3,
        "kTargetBlocks": 64,
    },
}

# Against the float64 reference on the same (rounded) inputs.
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


# ---------------------------------------------------------------------------
# Build.

P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
# The entry points of tests/cuda_emulation/driver_dilated_attention.cpp: name -> (argtypes, restype).
SIGNATURES = {
    "mdc_plan": ([P, P, I, I, P], None),
    "sa_plan": ([P, I, P], None),
    "mdc_taps": ([P, P, L, P], L),
    "mdc_forward": ([I, P, P, P, P, P, I, P, P], I),
    "mdc_backward": ([I, P, P, P, P, P, P, I, P, P, P, P, P], I),
    "sa_forward": ([I, P, P, P, P, P, P], I),
    "sa_backward": ([I, P, P, P, P, P, P, P, P, P, P, P], I),
    "core_taps": ([I, L, L, L, L], L),
}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> dict[str, EmulatedLibrary]:
    files = [*HEADERS, *(f"{kernel}{ext}" for kernel in KERNELS for ext in (".cu", ".h"))]
    return build_emulations(tmp_path_factory.mktemp("cuda_emulation_dilated_attention"),
                            "driver_dilated_attention.cpp", files, SMALL_LIMITS, SIGNATURES)


# ---------------------------------------------------------------------------
# The torch wrappers of csrc/cuda/{multi_dilation_conv,spatial_attention}_cuda.cpp, in Python: their
# buffers and sums of partials from their launch plans (csrc/cuda/launch_plan.h).

def mdc_dims(x, weight, dilations, combine) -> tuple[torch.Tensor, torch.Tensor]:
    B, cin, H, W = x.shape
    n, cout = weight.shape[:2]
    dims = torch.tensor([B, cin, cout, H, W, n, int(combine == "concat")], dtype=torch.int64)
    return dims, torch.tensor(list(dilations), dtype=torch.int64)


def emulated_mdc_forward(emu: EmulatedLibrary, x, weight, dilations, bias, combine, relu):
    dims, dil = mdc_dims(x, weight, dilations, combine)
    (acc_plan,) = read_plan(emu.lib.mdc_plan, (dims.data_ptr(), dil.data_ptr(), int(relu), 0), 1)
    n, cout = weight.shape[:2]
    channels = n * cout if combine == "concat" else cout
    packed = weight.permute(0, 3, 4, 2, 1).contiguous()
    gx, gw = guarded_input(x), guarded_input(packed)
    gb = guarded_input(bias) if bias is not None else None
    out = guarded_output((x.shape[0], channels, x.shape[2], x.shape[3]), x.dtype)
    acc = acc_plan.allocate(x.dtype, ACC_DTYPE[x.dtype])
    status = emu.lib.mdc_forward(DTYPE_CODE[x.dtype], dims.data_ptr(), dil.data_ptr(), gx.ptr(), gw.ptr(),
                                 ptr_or_none(gb), int(relu), out.ptr(), ptr_or_none(acc))
    emu.check(status, "multi_dilation_conv forward")
    assert_unchanged(gx, x, "x")
    assert_unchanged(gw, packed, "the weight")
    if gb is not None:
        assert_unchanged(gb, bias, "the bias")
    acc_plan.check(acc, "the forward scratch")
    assert_written(out, "output")
    return out.t


def emulated_mdc_backward(emu: EmulatedLibrary, grad_output, x, weight, dilations, output, combine, relu):
    dims, dil = mdc_dims(x, weight, dilations, combine)
    plan = read_plan(emu.lib.mdc_plan, (dims.data_ptr(), dil.data_ptr(), int(relu), 1), 4)
    acc_dtype = ACC_DTYPE[x.dtype]
    packed = weight.permute(0, 3, 4, 2, 1).contiguous()
    ggo, gx_in, gw, gout = (guarded_input(t) for t in (grad_output, x, packed, output))
    gx = guarded_output(x.shape, x.dtype)
    # grad_weight partials zero-filled: the kernels write the slots of the taps that read the map.
    gw_partial, gb_partial, pre, gx_acc = (b.allocate(x.dtype, acc_dtype) for b in plan)
    status = emu.lib.mdc_backward(DTYPE_CODE[x.dtype], dims.data_ptr(), dil.data_ptr(), ggo.ptr(), gx_in.ptr(),
                                  gw.ptr(), gout.ptr(), int(relu), ptr_or_none(gx), gw_partial.ptr(),
                                  gb_partial.ptr(), ptr_or_none(pre), ptr_or_none(gx_acc))
    emu.check(status, "multi_dilation_conv backward")
    for g, t, what in ((ggo, grad_output, "grad_output"), (gx_in, x, "x"), (gw, packed, "the weight"),
                       (gout, output, "output")):
        assert_unchanged(g, t, what)
    assert_written(gx, "grad_x")
    for b, g, what in zip(plan, (gw_partial, gb_partial, pre, gx_acc),
                          ("grad_weight partials", "grad_bias partials", "the grad_pre scratch",
                           "the grad_x scratch")):
        b.check(g, what)
    return gx.t, plan[0].reduce(gw_partial.t, x.dtype), plan[1].reduce(gb_partial.t, x.dtype)


def emulated_sa_forward(emu: EmulatedLibrary, x, weight):
    dims = torch.tensor(list(x.shape) + [weight.shape[-1]], dtype=torch.int64)
    plan = read_plan(emu.lib.sa_plan, (dims.data_ptr(), 0), 2)
    acc_dtype = ACC_DTYPE[x.dtype]
    gx, gw = guarded_input(x), guarded_input(weight)
    out = guarded_output(x.shape, x.dtype)
    pooled, gate = (b.allocate(x.dtype, acc_dtype) for b in plan)
    status = emu.lib.sa_forward(DTYPE_CODE[x.dtype], dims.data_ptr(), gx.ptr(), gw.ptr(), ptr_or_none(out),
                                ptr_or_none(pooled), ptr_or_none(gate))
    emu.check(status, "spatial_attention forward")
    assert_unchanged(gx, x, "x")
    assert_unchanged(gw, weight, "the weight")
    plan[0].check(pooled, "the pooled scratch")
    plan[1].check(gate, "the gate scratch")
    assert_written(out, "output")
    return out.t


def emulated_sa_backward(emu: EmulatedLibrary, grad_output, x, weight):
    dims = torch.tensor(list(x.shape) + [weight.shape[-1]], dtype=torch.int64)
    plan = read_plan(emu.lib.sa_plan, (dims.data_ptr(), 1), 6)
    acc_dtype = ACC_DTYPE[x.dtype]
    ggo, gx_in, gw = guarded_input(grad_output), guarded_input(x), guarded_input(weight)
    gx = guarded_output(x.shape, x.dtype)
    gw_partial, *bufs = (b.allocate(x.dtype, acc_dtype) for b in plan)
    status = emu.lib.sa_backward(DTYPE_CODE[x.dtype], dims.data_ptr(), ggo.ptr(), gx_in.ptr(), gw.ptr(),
                                 ptr_or_none(gx), gw_partial.ptr(), *(ptr_or_none(b) for b in bufs))
    emu.check(status, "spatial_attention backward")
    for g, t, what in ((ggo, grad_output, "grad_output"), (gx_in, x, "x"), (gw, weight, "the weight")):
        assert_unchanged(g, t, what)
    assert_written(gx, "grad_x")
    plan[0].check(gw_partial, "grad_weight partials")
    for b, g in zip(plan[1:], bufs):
        b.check(g, "a backward scratch buffer")
    return gx.t, plan[0].reduce(gw_partial.t, x.dtype)


# ---------------------------------------------------------------------------
# Oracles: the reference ops in float64 (on the same, rounded, inputs), autograd.

def reference_mdc(x, weight, dilations, bias, combine, relu, grad_output):
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    n, cout = weight.shape[:2]
    channels = n * cout if combine == "concat" else cout
    # A zero bias when there is none: the output is the same, and grad_bias is always returned.
    b64 = (bias.double() if bias is not None else torch.zeros(channels, dtype=torch.float64)).requires_grad_()
    out = reference.multi_dilation_conv(x64, w64, dilations, b64, combine, relu)
    out.backward(grad_output.double())
    return out.detach(), x64.grad, w64.grad, b64.grad


def reference_sa(x, weight, grad_output):
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    out = reference.spatial_attention(x64, w64)
    out.backward(grad_output.double())
    return out.detach(), x64.grad, w64.grad


def assert_close(got, expected, dtype, what):
    torch.testing.assert_close(got.double(), expected, **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------
# multi_dilation_conv cases.

@dataclass
class ConvCase:
    x: tuple[int, int, int, int]  # (B, Cin, H, W)
    cout: int
    dilations: tuple[int, ...]
    combine: str = "sum"
    relu: bool = False
    bias: bool = True
    dtype: torch.dtype = torch.float64


CONV_CASES = {
    "sum_relu_bias_f64": ConvCase((2, 3, 7, 6), 4, (1, 2, 3), "sum", True),
    "concat_1x1_branch_f64": ConvCase((1, 4, 5, 9), 3, (0, 1, 5), "concat", False),
    "sum_dilations_beyond_map_nobias_f64": ConvCase((2, 2, 6, 5), 3, (12, 18), "sum", False, False),
    "concat_relu_1x1_map_f32": ConvCase((2, 2, 1, 1), 2, (2, 0, 20), "concat", True, False, torch.float32),
    "sum_relu_aspp_14x14_f32": ConvCase((1, 5, 14, 14), 6, (1, 6, 12, 18), "sum", True, True, torch.float32),
    # More channels than a chunk / a channel tile, more pixels than a tile (the real build's limits).
    "concat_relu_chunks_tiles_f32": ConvCase((1, 19, 17, 18), 17, (1, 3), "concat", True, True, torch.float32),
    # More taps than one launch takes: the "sum" and grad_x scratch paths of the real build.
    "sum_many_branches_f64": ConvCase((1, 2, 10, 9), 2, tuple(range(1, 10)), "sum", True, True),
    "concat_many_branches_f32": ConvCase((1, 2, 4, 5), 2, (1, 2, 3, 0, 4, 1, 2, 3, 9), "concat", False, True,
                                         torch.float32),
    "sum_relu_batch1_odd_f16": ConvCase((1, 3, 6, 7), 4, (1, 2), "sum", True, True, torch.float16),
    "concat_relu_bf16": ConvCase((2, 4, 5, 5), 3, (0, 3), "concat", True, True, torch.bfloat16),
    "sum_batch0_f32": ConvCase((0, 3, 4, 4), 2, (1, 2), "sum", True, True, torch.float32),
}


def conv_inputs(case: ConvCase, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, cin, H, W = case.x
    n, cout = len(case.dilations), case.cout
    channels = n * cout if case.combine == "concat" else cout

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(case.dtype)

    x = randn(B, cin, H, W)
    weight = randn(n, cout, cin, 3, 3, scale=0.5)
    bias = randn(channels) if case.bias else None
    grad_output = randn(B, channels, H, W)
    return x, weight, bias, grad_output


def run_conv_case(emu: EmulatedLibrary, case: ConvCase, seed: int):
    x, weight, bias, grad_output = conv_inputs(case, seed)
    dilations = list(case.dilations)
    emu.lib.emu_reset(seed)
    out64, gx64, gw64, gb64 = reference_mdc(x, weight, dilations, bias, case.combine, case.relu, grad_output)
    out = emulated_mdc_forward(emu, x, weight, dilations, bias, case.combine, case.relu)
    assert_close(out, out64, case.dtype, "forward")
    # The backward gets the forward's output in the input dtype (its sign is the ReLU's mask).
    gx, gw, gb = emulated_mdc_backward(emu, grad_output, x, weight, dilations, out64.to(case.dtype),
                                       case.combine, case.relu)
    assert_close(gx, gx64, case.dtype, "grad_x")
    assert_close(gw, gw64, case.dtype, "grad_weight")
    assert_close(gb, gb64, case.dtype, "grad_bias")
    return emu.kernels()


@pytest.mark.parametrize("build", ["real", "small"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_multi_dilation_conv_matches_reference(emulated, name, build):
    run_conv_case(emulated[build], CONV_CASES[name], seed=zlib.crc32(name.encode()))


def test_multi_dilation_conv_taps_reading_only_padding_are_skipped(emulated):
    """The host's tap list: at dilations 12 / 18 on a 14x14 map, the 9 taps of
    dilation 12 and the centre tap of 18; on a 6x5 map only the centre taps;
    a 1x1 branch has its centre tap only."""
    lib = emulated["real"].lib

    def taps(hw, dilations):
        x = torch.empty(1, 1, *hw)
        dims, dil = mdc_dims(x, torch.empty(len(dilations), 1, 1, 3, 3), dilations, "sum")
        rows = torch.zeros(3 * 9 * len(dilations), dtype=torch.int64)
        n = lib.mdc_taps(dims.data_ptr(), dil.data_ptr(), 9 * len(dilations), rows.data_ptr())
        return [tuple(r) for r in rows[:3 * n].view(n, 3).tolist()]

    got = taps((14, 14), [12, 18])
    assert len(got) == 10 and (9 + 4, 0, 0) in got and all(s < 9 for s, _, _ in got if s != 13), got
    assert taps((6, 5), [12, 18]) == [(4, 0, 0), (13, 0, 0)]
    assert taps((4, 4), [0, 1]) == [(4, 0, 0)] + [(9 + t, dy, dx) for t, (dy, dx) in
                                                  enumerate((a, b) for a in (-1, 0, 1) for b in (-1, 0, 1))]
    assert taps((5, 9), [6]) == [(3, 0, -6), (4, 0, 0), (5, 0, 6)]  # rows shift by 6 >= 5: padding only


def test_small_build_runs_every_path(emulated):
    """The small build splits the taps over several launches (scratch
    accumulation for "sum" and grad_x, branch groups for "concat") and
    grid-strides; the real build does the same case in one launch per kernel."""
    case = CONV_CASES["sum_relu_bias_f64"]  # 27 taps
    small = run_conv_case(emulated["small"], case, seed=3)
    real = run_conv_case(emulated["real"], case, seed=3)
    conv = [k for k in small if "dilated_taps_conv_kernel" in k]
    assert len(conv) == 2 * 3, small  # forward and grad_x: 27 taps, 9 per launch
    assert len([k for k in real if "dilated_taps_conv_kernel" in k]) == 2, real
    concat = run_conv_case(emulated["small"], CONV_CASES["concat_relu_chunks_tiles_f32"], seed=3)
    assert len([k for k in concat if "dilated_taps_conv_kernel" in k]) == 2 + 2, concat


def test_core_tap_ranges(emulated):
    """tap_reaches, tap_only_padding and the window bounds of csrc/core/dilated_taps.h
    (as compiled into the kernels) against brute force."""
    f = emulated["real"].lib.core_taps
    for length in range(1, 8):
        for shift in range(-9, 10):
            inside = [pos for pos in range(length) if 0 <= pos + shift < length]
            begin, end = f(0, shift, length, 0, 0), f(1, shift, length, 0, 0)
            assert (begin, end) == (inside[0], inside[-1] + 1) if inside else begin >= end
            for first in range(length):
                for last in range(first + 1, length + 1):
                    assert f(2, shift, length, first, last) == any(first <= q < last for q in inside)
            for other in (1, 3):  # the other axis, unshifted, always reads inside
                assert f(3, shift, 0, length, other) == f(3, 0, shift, other, length) == (not inside)
        for size in (1, 3, 5, 7):
            r = size // 2
            for pos in range(length):
                valid = [k for k in range(size) if 0 <= pos + k - r < length]
                assert (f(4, pos, r, 0, 0), f(5, pos, r, size, length)) == (valid[0], valid[-1] + 1)


# ---------------------------------------------------------------------------
# spatial_attention cases.

@dataclass
class AttentionCase:
    x: tuple[int, int, int, int]  # (B, C, H, W)
    k: int = 7
    dtype: torch.dtype = torch.float64
    ties: bool = False  # small integers: channel maxima tie


ATTENTION_CASES = {
    "k7_f64": AttentionCase((2, 5, 9, 8), 7),
    "k3_c1_f64": AttentionCase((1, 1, 6, 7), 3),
    "k7_ties_f32": AttentionCase((2, 6, 5, 7), 7, torch.float32, ties=True),
    "k3_ties_f64": AttentionCase((1, 4, 4, 3), 3, ties=True),
    "k7_map_smaller_than_window_f32": AttentionCase((2, 3, 3, 2), 7, torch.float32),
    "k7_many_channels_pixels_f32": AttentionCase((1, 19, 13, 11), 7, torch.float32),
    "k3_1x1_map_f64": AttentionCase((1, 3, 1, 1), 3),
    "k7_f16": AttentionCase((2, 4, 8, 9), 7, torch.float16),
    "k3_bf16": AttentionCase((1, 6, 5, 7), 3, torch.bfloat16),
    "k7_batch0_f32": AttentionCase((0, 3, 4, 4), 7, torch.float32),
}


def run_attention_case(emu: EmulatedLibrary, case: AttentionCase, seed: int):
    g = torch.Generator().manual_seed(seed)
    if case.ties:
        x = torch.randint(-2, 3, case.x, generator=g).to(case.dtype)
    else:
        x = torch.randn(case.x, generator=g, dtype=torch.float64).to(case.dtype)
    weight = (torch.randn(1, 2, case.k, case.k, generator=g, dtype=torch.float64) * 0.3).to(case.dtype)
    grad_output = torch.randn(case.x, generator=g, dtype=torch.float64).to(case.dtype)
    emu.lib.emu_reset(seed)
    out64, gx64, gw64 = reference_sa(x, weight, grad_output)
    assert_close(emulated_sa_forward(emu, x, weight), out64, case.dtype, "forward")
    gx, gw = emulated_sa_backward(emu, grad_output, x, weight)
    assert_close(gx, gx64, case.dtype, "grad_x")
    assert_close(gw, gw64, case.dtype, "grad_weight")


@pytest.mark.parametrize("build", ["real", "small"])
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_spatial_attention_matches_reference(emulated, name, build):
    run_attention_case(emulated[build], ATTENTION_CASES[name], seed=zlib.crc32(name.encode()))
