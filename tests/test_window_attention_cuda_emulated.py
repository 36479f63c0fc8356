"""The CUDA kernels of window_attention, run on the CPU.

Without a GPU, this module compiles a copy of
csrc/cuda/window_attention_kernel.cu with g++ against the emulation of
tests/cuda_emulation/cuda_emu.h (threads as fibers, blocks one after another;
see that file for what is and is not emulated), calls the launchers through
tests/cuda_emulation/driver_window_attention.cpp and ctypes the way the torch
wrapper csrc/cuda/window_attention_cuda.cpp does, and compares the forward
output, the log-sum-exp and all six gradients with the reference op
(medmtl.ops.reference.window_attention, differentiated by autograd in float64).
Two builds: the kernels as they are, and a "small limits" one with tiny
blocks, tiles, head_dim chunks, shared bias table and grid, so that the
multi-tile, multi-chunk, global-memory table-gradient and grid-stride paths
run on small inputs.

Buffers handed to the kernels sit between guard zones: writes outside the
outputs are reported, reads outside the inputs (and of scratch before it is
written) see NaN, outputs start out filled with a sentinel that must be
overwritten. The build and the guarded buffers are shared with the other
*_cuda_emulated tests (tests/cuda_emulation_build.py,
tests/cuda_emulation_buffers.py).
"""

from __future__ import annotations

import ctypes
import math
import zlib
from dataclasses import dataclass, replace
from unittest import mock

import pytest
import torch

from medmtl.ops import reference
from tests.cuda_emulation_buffers import assert_unchanged, assert_written, guarded_input, guarded_output, ptr_or_none
from tests.cuda_emulation_build import ACC_DTYPE, DTYPE_CODE, EmulatedLibrary, build_emulations
from tests.cuda_emulation_plan import read_plan

KERNEL = "window_attention_kernel"
# Included by the kernels (acc_type, to_acc) and the driver (the wrapper's launch plan).
HEADERS = ("multiscale_pool_kernel.h", "device_common.cuh", "launch_plan.h")

# The "small limits" build: constant -> value. One warp per block, tiles that
# divide nothing, head_dim chunks of 2-4 (several chunks, a partial last one,
# for every head_dim > 4), shared table gradients only for tables of at most
# 40 (30 for double) rows (the others take the global-memory path), 3 blocks
# (grid-stride loops).
SMALL_LIMITS = {
    "kThreads": 32,
    "kTileQueries": 5, "kTileKeys": 7, "kForwardChunk": 4, "kBackwardChunk": 3, "kSharedBiasRows": 40,
    "kTileQueriesDouble": 6, "kTileKeysDouble": 4, "kForwardChunkDouble": 3, "kBackwardChunkDouble": 2,
    "kSharedBiasRowsDouble": 30,
    "kMaxGridX": 3,
}

# Against the float64 reference on the same (rounded) inputs. The 16-bit
# backward also gets the forward's output rounded to the input dtype.
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


# ---------------------------------------------------------------------------
# Build.

P, I, D = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
# The entry points of tests/cuda_emulation/driver_window_attention.cpp: name -> (argtypes, restype).
SIGNATURES = {
    "wa_geometry": ([P, P], None),
    "wa_workspace": ([I, P, P], I),
    "wa_backward_plan": ([I, P, P], I),
    "wa_forward": ([I, P, P, P, P, P, P, P, P, P, P, D, P, P], I),
    "wa_backward": ([I, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, D, P, P, P, P, P, P, P, P], I),
}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> dict[str, EmulatedLibrary]:
    return build_emulations(tmp_path_factory.mktemp("cuda_emulation_window_attention"),
                            "driver_window_attention.cpp", [*HEADERS, f"{KERNEL}.h", f"{KERNEL}.cu"],
                            {f"{KERNEL}.cu": SMALL_LIMITS}, SIGNATURES)


# ---------------------------------------------------------------------------
# Cases and inputs.

@dataclass
class Case:
    spatial: tuple[int, ...]  # (H, W) or (D, H, W)
    window: tuple[int, ...]
    shift: tuple[int, ...]
    batch: int = 1
    heads: int = 2
    head_dim: int = 5
    dtype: torch.dtype = torch.float64
    packed: bool = True         # q, k, v are slices of one (B, *S, 3, heads, hd) tensor
    strided_grad: bool = False  # grad_out a slice of (B, *S, heads, 2, hd)
    scale: float | None = None  # head_dim ** -0.5 when None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, *self.spatial, self.heads, self.head_dim)

    @property
    def table_rows(self) -> int:
        return math.prod(2 * w - 1 for w in self.window)


CASES = {
    # Sizes the window does not divide (padding in both dims), shifted.
    "2d_15x9_w4_s2_f64": Case((15, 9), (4, 4), (2, 2), batch=2, heads=2, head_dim=5),
    "2d_15x9_w4_unshifted_f32": Case((15, 9), (4, 4), (0, 0), batch=1, heads=3, head_dim=5, dtype=torch.float32,
                                     packed=False),
    # The whole map is one window: the shift is dropped (no mask).
    "2d_7x7_w7_s3_f64": Case((7, 7), (7, 7), (3, 3), batch=2, heads=1, head_dim=8, strided_grad=True),
    # Maps smaller than the window: effective window = map, bias from the configured table.
    "2d_3x5_smaller_than_w7_f32": Case((3, 5), (7, 7), (3, 3), batch=2, heads=3, head_dim=4, dtype=torch.float32),
    # One dim whole (no shift there), the other padded and shifted; N = 49 (several key / query tiles).
    "2d_7x9_w7_s3_f32": Case((7, 9), (7, 7), (3, 3), batch=1, heads=1, head_dim=4, dtype=torch.float32,
                             scale=0.7),
    "3d_5x6x7_w3_s1_f64": Case((5, 6, 7), (3, 3, 3), (1, 1, 1), batch=1, heads=2, head_dim=5),
    "3d_4x5x3_mixed_f64": Case((4, 5, 3), (2, 3, 4), (1, 0, 2), batch=2, heads=1, head_dim=3, strided_grad=True),
    # head_dim 32: one chunk in the real build's forward (64) and backward (32); many in the small build.
    "2d_6x6_w3_s1_hd32_f32": Case((6, 6), (3, 3), (1, 1), batch=1, heads=1, head_dim=32, dtype=torch.float32),
    # head_dim 33 in double: two forward and three backward chunks in the real build.
    "2d_5x4_w3_s1_hd33_f64": Case((5, 4), (3, 3), (1, 1), batch=1, heads=2, head_dim=33, packed=False),
    # A table larger than the shared-memory gradient (9^3 window: 4913 rows): the global-memory path.
    "3d_2x2x3_smaller_than_w9_f32": Case((2, 2, 3), (9, 9, 9), (4, 4, 4), batch=2, heads=2, head_dim=3,
                                          dtype=torch.float32),
    "2d_9x10_w4_s2_f16": Case((9, 10), (4, 4), (2, 2), batch=1, heads=2, head_dim=8, dtype=torch.float16),
    "3d_4x5x6_w3_s1_bf16": Case((4, 5, 6), (3, 3, 3), (1, 1, 1), batch=2, heads=1, head_dim=4,
                                dtype=torch.bfloat16),
    "2d_6x7_w4_s0_f16_hd32": Case((6, 7), (4, 4), (0, 0), batch=1, heads=1, head_dim=32, dtype=torch.float16),
    # Swin's sizes: 7x7 windows (N = 49) shifted by 3 on a 14x14 map, head_dim 32; and a
    # 7x7x7 window (N = 343: 11 query and key tiles) shifted by 3 on an 8x8x8 volume.
    "2d_14x14_w7_s3_hd32_f32": Case((14, 14), (7, 7), (3, 3), batch=1, heads=2, head_dim=32, dtype=torch.float32),
    "3d_8x8x8_w7_s3_f32": Case((8, 8, 8), (7, 7, 7), (3, 3, 3), batch=1, heads=1, head_dim=4, dtype=torch.float32),
    # Logits spread by hundreds: keys of another shift region get Swin's -100, not -inf,
    # and here that changes the answer (many of them outscore the visible keys by > 100).
    "2d_8x8_w4_s2_large_logits_f64": Case((8, 8), (4, 4), (2, 2), batch=1, heads=1, head_dim=4, scale=40.0),
}


def make_inputs(case: Case, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(case.dtype)

    B, S, h, hd = case.batch, case.spatial, case.heads, case.head_dim
    if case.packed:
        qkv = randn(B, *S, 3, h, hd)
        q, k, v = qkv.unbind(-3)
        assert not q.is_contiguous() or B * math.prod(S) == 1
    else:
        qkv = None
        q, k, v = randn(*case.shape), randn(*case.shape), randn(*case.shape)
    if case.strided_grad:
        grad_out_base = randn(B, *S, h, 2, hd)
        grad_out = grad_out_base[..., 1, :]
    else:
        grad_out_base = None
        grad_out = randn(*case.shape)
    return dict(qkv=qkv, q=q, k=k, v=v, table=randn(case.table_rows, h, scale=0.5),
                pad_key=randn(h, hd), pad_value=randn(h, hd), grad_out=grad_out, grad_out_base=grad_out_base)


def scale_of(case: Case) -> float:
    return case.scale if case.scale is not None else case.head_dim ** -0.5


def geometry_array(case: Case) -> torch.Tensor:
    """batch heads head_dim size[3] window[3] shift[3], 2-D as depth 1 (window 1, shift 0)."""
    pad = 3 - len(case.spatial)
    size = (1,) * pad + tuple(case.spatial)
    window = (1,) * pad + tuple(case.window)
    shift = (0,) * pad + tuple(case.shift)
    return torch.tensor([case.batch, case.heads, case.head_dim, *size, *window, *shift], dtype=torch.int64)


def strides_array(t: torch.Tensor) -> torch.Tensor:
    """Element strides (batch, depth, height, width, head) of a token map, as token_strides gives."""
    assert t.stride(-1) == 1
    nd = t.dim() - 3
    dims = [0] * (3 - nd) + [t.stride(1 + d) for d in range(nd)]
    return torch.tensor([t.stride(0), *dims, t.stride(-2)], dtype=torch.int64)


def geometry(emu: EmulatedLibrary, case: Case) -> dict[str, object]:
    geo, res = geometry_array(case), torch.zeros(16, dtype=torch.int64)
    emu.lib.wa_geometry(geo.data_ptr(), res.data_ptr())
    r = res.tolist()
    return dict(tokens=r[0], windows=r[1], table_rows=r[2], masked=bool(r[3]), window=tuple(r[4:7]),
                shift=tuple(r[7:10]), padded=tuple(r[10:13]), count=tuple(r[13:16]))


# ---------------------------------------------------------------------------
# The torch wrapper of csrc/cuda/window_attention_cuda.cpp, in Python.

class TokenMaps:
    """q, k, v in guarded buffers: one (B, *S, 3, heads, hd) buffer for packed
    inputs (q, k, v at element offsets 0, heads * hd, 2 * heads * hd), else three."""

    def __init__(self, inputs):
        self.inputs = inputs
        if inputs["qkv"] is not None:
            self.base = [guarded_input(inputs["qkv"])]
            step = inputs["q"].shape[-2] * inputs["q"].shape[-1]
            self.ptrs = [self.base[0].ptr(i * step) for i in range(3)]
        else:
            self.base = [guarded_input(inputs[n]) for n in ("q", "k", "v")]
            self.ptrs = [b.ptr() for b in self.base]
        self.strides = [strides_array(inputs[n]) for n in ("q", "k", "v")]

    def args(self) -> list[int]:
        out = []
        for p, s in zip(self.ptrs, self.strides):
            out += [p, s.data_ptr()]
        return out

    def assert_unchanged(self):
        if self.inputs["qkv"] is not None:
            assert_unchanged(self.base[0], self.inputs["qkv"], "qkv")
        else:
            for b, n in zip(self.base, ("q", "k", "v")):
                assert_unchanged(b, self.inputs[n], n)


def workspace(emu: EmulatedLibrary, case: Case) -> list[int]:
    geo, res = geometry_array(case), torch.zeros(3, dtype=torch.int64)
    assert emu.lib.wa_workspace(DTYPE_CODE[case.dtype], geo.data_ptr(), res.data_ptr()) == 0
    return res.tolist()


def emulated_forward(emu: EmulatedLibrary, case: Case, inputs):
    geo = geometry_array(case)
    maps = TokenMaps(inputs)
    params = [guarded_input(inputs[n]) for n in ("table", "pad_key", "pad_value")]
    out = guarded_output(case.shape, case.dtype)
    lse = guarded_output(case.shape[:-1], ACC_DTYPE[case.dtype])
    status = emu.lib.wa_forward(DTYPE_CODE[case.dtype], geo.data_ptr(), *maps.args(), *(p.ptr() for p in params),
                                scale_of(case), out.ptr(), lse.ptr())
    emu.check(status, "window_attention forward")
    maps.assert_unchanged()
    for p, n in zip(params, ("table", "pad_key", "pad_value")):
        assert_unchanged(p, inputs[n], n)
    assert_written(out, "out")
    assert_written(lse, "lse")
    return out.t, lse.t


def emulated_backward(emu: EmulatedLibrary, case: Case, inputs, out, lse):
    geo = geometry_array(case)
    acc = ACC_DTYPE[case.dtype]
    plan = read_plan(emu.lib.wa_backward_plan, (DTYPE_CODE[case.dtype], geo.data_ptr()), 5)
    maps = TokenMaps(inputs)
    params = [guarded_input(inputs[n]) for n in ("table", "pad_key", "pad_value")]
    # grad_out: its own buffer, with its (possibly strided) layout.
    go_src = inputs["grad_out"]
    if inputs["grad_out_base"] is None:
        g_go = guarded_input(go_src)
        go_ptr = g_go.ptr()
    else:  # the (B, *S, heads, 2, hd) tensor it is a slice of, at element offset hd
        g_go = guarded_input(inputs["grad_out_base"])
        go_ptr = g_go.ptr(case.head_dim)
    g_out, g_lse = guarded_input(out), guarded_input(lse)
    gq, gk, gv = (guarded_output(case.shape, case.dtype) for _ in range(3))
    table_partial, pk_partial, pv_partial, delta, gq_acc = (b.allocate(case.dtype, acc) for b in plan)
    go_strides, out_strides = strides_array(go_src), strides_array(out)
    status = emu.lib.wa_backward(
        DTYPE_CODE[case.dtype], geo.data_ptr(), go_ptr, go_strides.data_ptr(), *maps.args(), g_out.ptr(),
        out_strides.data_ptr(), g_lse.ptr(),
        *(p.ptr() for p in params), scale_of(case), gq.ptr(), gk.ptr(), gv.ptr(), table_partial.ptr(),
        pk_partial.ptr(), pv_partial.ptr(), ptr_or_none(delta), ptr_or_none(gq_acc))
    emu.check(status, "window_attention backward")
    maps.assert_unchanged()
    for p, n in zip(params, ("table", "pad_key", "pad_value")):
        assert_unchanged(p, inputs[n], n)
    assert_unchanged(g_out, out, "out")
    assert_unchanged(g_lse, lse, "lse")
    assert_unchanged(g_go, inputs["grad_out"] if inputs["grad_out_base"] is None else inputs["grad_out_base"],
                     "grad_out")
    for g, what in ((gq, "grad_q"), (gk, "grad_k"), (gv, "grad_v")):
        assert_written(g, what)
    partials = (table_partial, pk_partial, pv_partial)
    for b, g, what in zip(plan, (*partials, delta, gq_acc),
                          ("grad_table partials", "grad_pad_key partials", "grad_pad_value partials",
                           "the delta scratch", "the grad_q scratch")):
        b.check(g, what)
    # The wrapper's sums of the per-window partials.
    return (gq.t, gk.t, gv.t, *(b.reduce(g.t, case.dtype) for b, g in zip(plan, partials)))


# ---------------------------------------------------------------------------
# Oracles: the reference op in float64 (on the same, rounded, inputs).

def reference_args(case: Case, inputs, grad: bool):
    names = ("q", "k", "v", "table", "pad_key", "pad_value")
    leaves = [inputs[n].detach().double().requires_grad_(grad) for n in names]
    return leaves


def call_reference(case: Case, q, k, v, table, pad_key, pad_value, *, window=None, shift=None):
    return reference.window_attention(q, k, v, list(window or case.window), list(shift or case.shift), table,
                                      scale_of(case), pad_key, pad_value)


def reference_forward_backward(case: Case, inputs):
    leaves = reference_args(case, inputs, grad=True)
    out = call_reference(case, *leaves)
    out.backward(inputs["grad_out"].double())
    return out.detach(), [t.grad for t in leaves]


def reference_lse(case: Case, inputs) -> torch.Tensor:
    """logsumexp over each query's visible keys, from the reference itself: with
    its softmax replaced by exp (unnormalised weights) and every value 1, its
    output is sum_j exp(S_ij) (keys of other regions get S - 100 there: a
    relative e^-100, invisible in float64)."""
    q, k, v, table, pad_key, pad_value = reference_args(case, inputs, grad=False)
    with torch.no_grad(), mock.patch.object(torch, "softmax", lambda s, dim: torch.exp(s)):
        total = call_reference(case, q, k, torch.ones_like(v), table, pad_key, torch.ones_like(pad_value))
    return total[..., 0].log()


def assert_close(got, expected, dtype, what):
    torch.testing.assert_close(got.double(), expected, **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}")


def run_case(emu: EmulatedLibrary, case: Case, seed: int):
    inputs = make_inputs(case, seed)
    emu.lib.emu_reset(seed)
    out64, grads64 = reference_forward_backward(case, inputs)
    out, lse = emulated_forward(emu, case, inputs)
    assert_close(out, out64, case.dtype, "out")
    assert_close(lse, reference_lse(case, inputs), torch.float64 if case.dtype == torch.float64 else torch.float32,
                 "lse")
    # The backward gets the forward's own out (in the input dtype) and lse, as under autograd.
    grads = emulated_backward(emu, case, inputs, out, lse)
    for name, got, expected in zip(("grad_q", "grad_k", "grad_v", "grad_table", "grad_pad_key", "grad_pad_value"),
                                   grads, grads64):
        assert_close(got, expected, case.dtype, name)
    return out, grads


# ---------------------------------------------------------------------------
# Tests.

@pytest.mark.parametrize("build", ["real", "small"])
@pytest.mark.parametrize("name", list(CASES))
def test_window_attention_matches_reference(emulated, name, build):
    run_case(emulated[build], CASES[name], seed=zlib.crc32(name.encode()))


def test_cases_cover_the_geometries(emulated):
    """The cases are what they claim, per core::window_geometry as compiled into the kernels."""
    g = lambda name: geometry(emulated["real"], CASES[name])  # noqa: E731
    a = g("2d_15x9_w4_s2_f64")
    assert a["padded"] == (1, 16, 12) and a["masked"] and a["windows"] == 12 and a["tokens"] == 16
    b = g("2d_7x7_w7_s3_f64")  # the whole map: shift dropped
    assert b["windows"] == 1 and b["shift"] == (0, 0, 0) and not b["masked"] and b["tokens"] == 49
    c = g("2d_3x5_smaller_than_w7_f32")
    assert c["window"] == (1, 3, 5) and c["table_rows"] == 169 and not c["masked"]
    d = g("2d_7x9_w7_s3_f32")
    assert d["window"] == (1, 7, 7) and d["shift"] == (0, 0, 3) and d["padded"] == (1, 7, 14) and d["masked"]
    e = g("3d_5x6x7_w3_s1_f64")
    assert e["padded"] == (6, 6, 9) and e["windows"] == 2 * 2 * 3 and e["tokens"] == 27 and e["masked"]
    f = g("3d_4x5x3_mixed_f64")  # width 3 <= window 4: whole; shift only in depth
    assert f["window"] == (2, 3, 3) and f["shift"] == (1, 0, 0) and f["padded"] == (4, 6, 3)
    big = g("3d_2x2x3_smaller_than_w9_f32")
    assert big["table_rows"] == 17 ** 3 > 4096 and big["tokens"] == 12


def test_small_build_runs_every_path(emulated):
    """The small build grid-strides (3 blocks for more items) with one-warp blocks,
    where the real build gives every item its own 128-thread block."""
    case = CASES["3d_5x6x7_w3_s1_f64"]  # 12 windows x 2 heads
    run_case(emulated["small"], case, seed=1)
    small = emulated["small"].launches()
    run_case(emulated["real"], case, seed=1)
    real = emulated["real"].launches()
    names = [k.split("<")[0].rsplit("::", 1)[-1] for k, _, _ in small]
    assert names == ["window_attention_forward_kernel", "window_attention_delta_kernel",
                     "window_attention_backward_kernel"], small
    assert all(grid == (3, 1, 1) and block == (32, 1, 1) for _, grid, block in small), small
    windows_heads = 12 * 2
    qtiles = -(-27 // 16)  # double query tiles of the real build
    assert [grid[0] for _, grid, _ in real] == [windows_heads * qtiles, -(-5 * 6 * 7 * 2 // 4), windows_heads]
    assert all(block == (128, 1, 1) for _, _, block in real), real


def test_batch_zero_launches_nothing(emulated):
    emu = emulated["real"]
    case = replace(CASES["2d_15x9_w4_s2_f64"], batch=0)
    emu.lib.emu_reset(0)
    assert workspace(emu, case) == [0, 0, 0]
    geo, strides = geometry_array(case), torch.zeros(5, dtype=torch.int64)
    maps = [None, strides.data_ptr()] * 3  # no data (null pointers): nothing may be read
    assert emu.lib.wa_forward(1, geo.data_ptr(), *maps, None, None, None, 1.0, None, None) == 0
    assert emu.lib.wa_backward(1, geo.data_ptr(), None, strides.data_ptr(), *maps, None, strides.data_ptr(),
                               *([None] * 4), 1.0, *([None] * 8)) == 0
    assert emu.launches() == []


def test_index_range_beyond_int32_is_refused(emulated):
    """The kernels index in 32-bit (core::WindowGeometry32): a geometry whose padded token rows
    (batch x padded tokens x heads) reach 2^31 makes both launchers return an error
    (cudaErrorInvalidValue) before any launch."""
    emu = emulated["real"]
    case = CASES["2d_15x9_w4_s2_f64"]  # padded 16 x 12, 2 heads: 384 rows per image
    rows_per_image = 16 * 12 * case.heads
    big = replace(case, batch=2**31 // rows_per_image + 1)
    emu.lib.emu_reset(0)
    geo, strides = geometry_array(big), torch.zeros(5, dtype=torch.int64)
    maps = [None, strides.data_ptr()] * 3
    assert emu.lib.wa_forward(1, geo.data_ptr(), *maps, None, None, None, 1.0, None, None) == 1
    assert emu.lib.wa_backward(1, geo.data_ptr(), None, strides.data_ptr(), *maps, None, strides.data_ptr(),
                               *([None] * 4), 1.0, *([None] * 8)) == 1
    assert emu.launches() == []


def test_cases_discriminate(emulated):
    """What the comparisons would catch: on a shifted, padded 2-D and 3-D case, a
    kernel that ignored the shift (or the mask), the padding key / value or the
    bias table would give results the tolerances reject (checked here against
    the reference with those features removed)."""
    for name in ("2d_15x9_w4_s2_f64", "3d_5x6x7_w3_s1_f64"):
        case = CASES[name]
        inputs = make_inputs(case, seed=zlib.crc32(name.encode()))
        out, _ = emulated_forward(emulated["real"], case, inputs)
        q, k, v, table, pad_key, pad_value = reference_args(case, inputs, grad=False)
        variants = {
            "no shift": call_reference(case, q, k, v, table, pad_key, pad_value, shift=[0] * len(case.shift)),
            "zero padding": call_reference(case, q, k, v, table, torch.zeros_like(pad_key),
                                           torch.zeros_like(pad_value)),
            "no bias": call_reference(case, q, k, v, torch.zeros_like(table), pad_key, pad_value),
        }
        assert_close(out, call_reference(case, q, k, v, table, pad_key, pad_value), case.dtype, "out")
        for what, wrong in variants.items():
            with pytest.raises(AssertionError):
                assert_close(out, wrong, case.dtype, what)
