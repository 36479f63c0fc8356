"""Triton kernels of multiscale_pool, run on CPU tensors in Triton's interpreter
against the reference (medmtl.ops.reference.multiscale_pool under autograd), and
compiled ahead of time for sm_80 and sm_90 (no GPU needed).

tests/conftest.py sets TRITON_INTERPRET=1 (no GPU) before triton is imported; with a GPU
the launcher tests here are skipped (tests/test_gpu_backends.py runs the kernels compiled)
and the ahead-of-time compiles still run.
The interpreter is slow: shapes are tiny.
"""

import pytest  # noqa: E402
import torch  # noqa: E402


pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'medmtl[triton]')")

import medmtl.ops  # noqa: E402
from medmtl.kernels import multiscale_pool as kernels  # noqa: E402
from medmtl.ops import reference  # noqa: E402
from tests import triton_aot  # noqa: E402
from tests.ties import kink_between, spaced_normal  # noqa: E402


# A 2-D and a 3-D pyramid: several levels of different sizes, odd sizes, and
# output sizes larger than the input (9 on 7x5 and 4x6; 4 on 5x4x3 and 3x3x2).
PYRAMIDS = {
    2: ([(2, 3, 7, 5), (2, 2, 4, 6)], [1, 2, 3, 9]),
    3: ([(2, 3, 5, 4, 3), (2, 2, 3, 3, 2)], [1, 2, 4]),
}
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _inputs(shapes, dtype, seed, with_scale=True, with_shift=True):
    """Features, flat scale and shift (or None) of the given shapes, seeded.

    Distinct, evenly spaced feature values, and shifts that put each channel's
    ReLU kink halfway between two of them (tests/ties.py): no max or ReLU
    compares values within rounding of each other.
    """
    g = torch.Generator().manual_seed(seed)
    features = [spaced_normal(s, g, torch.float64) for s in shapes]
    channels = sum(s[1] for s in shapes)
    scale = torch.randn(channels, generator=g, dtype=torch.float64) if with_scale else torch.ones(channels,
                                                                                                   dtype=torch.float64)
    shift = torch.cat([kink_between(x, s, g) for x, s in zip(features, scale.split([s[1] for s in shapes]))])
    return ([x.to(dtype) for x in features], scale.to(dtype) if with_scale else None,
            shift.to(dtype) if with_shift else None)


def _columns(features, sizes):
    return sum(x.shape[1] for x in features) * sum(s ** (features[0].dim() - 2) for s in sizes)


def _reference(features, sizes, mode, scale, shift, relu, grad_output, dtype=None):
    """Reference output and gradients (features, flat scale, flat shift), in `dtype`
    (default: the features'). None scale/shift are taken as ones/zeros that need grad,
    which is what the kernels' backward computes."""
    dtype = dtype or features[0].dtype
    channels = [x.shape[1] for x in features]
    xs = [x.detach().to(dtype).requires_grad_() for x in features]
    sc = (torch.ones(sum(channels), dtype=dtype) if scale is None else scale.detach().to(dtype)).requires_grad_()
    sh = (torch.zeros(sum(channels), dtype=dtype) if shift is None else shift.detach().to(dtype)).requires_grad_()
    out = reference.multiscale_pool(xs, sizes, mode, list(sc.split(channels)), list(sh.split(channels)),
                                    "relu" if relu else None)
    out.backward(grad_output.to(dtype))
    return out.detach(), [x.grad for x in xs], sc.grad, sh.grad


# --------------------------------------------------------------------------
# The launchers, called directly


@pytest.mark.parametrize("relu", [False, True], ids=["id", "relu"])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("affine", ["both", "none"])
def test_launchers_match_reference_float64(dims, mode, relu, affine):
    shapes, sizes = PYRAMIDS[dims]
    features, scale, shift = _inputs(shapes, torch.float64, seed=dims * 10 + len(mode),
                                     with_scale=affine == "both", with_shift=affine == "both")
    out = kernels.multiscale_pool_forward(features, sizes, mode, scale, shift, relu)
    assert out.shape == (2, _columns(features, sizes)) and out.dtype == torch.float64
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_out, ref_gx, ref_gs, ref_gb = _reference(features, sizes, mode, scale, shift, relu, grad_output)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])

    gx, gs, gb = kernels.multiscale_pool_backward(grad_output, features, sizes, mode, scale, shift, relu)
    assert [g.shape for g in gx] == [x.shape for x in features]
    for g, r in zip(gx, ref_gx):
        torch.testing.assert_close(g, r, **TOL[torch.float64])
    torch.testing.assert_close(gs, ref_gs, **TOL[torch.float64])
    torch.testing.assert_close(gb, ref_gb, **TOL[torch.float64])


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
def test_launchers_float32_scale_only_and_shift_only(dims, mode):
    shapes, sizes = PYRAMIDS[dims]
    for seed, (with_scale, with_shift) in enumerate([(True, False), (False, True)]):
        features, scale, shift = _inputs(shapes, torch.float32, seed, with_scale, with_shift)
        out = kernels.multiscale_pool_forward(features, sizes, mode, scale, shift, True)
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        ref_out, ref_gx, ref_gs, ref_gb = _reference(features, sizes, mode, scale, shift, True, grad_output)
        torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
        gx, gs, gb = kernels.multiscale_pool_backward(grad_output, features, sizes, mode, scale, shift, True)
        for g, r in zip(gx, ref_gx):
            torch.testing.assert_close(g, r, **TOL[torch.float32])
        torch.testing.assert_close(gs, ref_gs, **TOL[torch.float32])
        torch.testing.assert_close(gb, ref_gb, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_launchers_half_precision(dtype, mode):
    """Low-precision inputs accumulate in float32: matches the float32 reference on the
    same (rounded) values up to the final rounding."""
    shapes, sizes = PYRAMIDS[2]
    features, scale, shift = _inputs(shapes, dtype, seed=7)
    out = kernels.multiscale_pool_forward(features, sizes, mode, scale, shift, True)
    assert out.dtype == dtype
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref_out, ref_gx, ref_gs, ref_gb = _reference(features, sizes, mode, scale, shift, True, grad_output,
                                                 dtype=torch.float32)
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    gx, gs, gb = kernels.multiscale_pool_backward(grad_output, features, sizes, mode, scale, shift, True)
    assert all(g.dtype == dtype for g in gx) and gs.dtype == dtype and gb.dtype == dtype
    for g, r in zip(gx, ref_gx):
        torch.testing.assert_close(g.float(), r, **tol)
    torch.testing.assert_close(gs.float(), ref_gs, **tol)
    torch.testing.assert_close(gb.float(), ref_gb, **tol)


@pytest.mark.parametrize("relu", [False, True], ids=["id", "relu"])
def test_max_ties_keep_first_position(relu):
    """Integer-valued inputs: many ties in each bin (and zeros after ReLU); PyTorch keeps
    the first position, so the gradient lands there."""
    shapes, sizes = [(2, 3, 7, 5)], [1, 2, 3, 9]
    g = torch.Generator().manual_seed(3)
    features = [torch.randint(-2, 3, shapes[0], generator=g).double()]
    scale = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    shift = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    out = kernels.multiscale_pool_forward(features, sizes, "max", scale, shift, relu)
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=g)
    ref_out, ref_gx, ref_gs, ref_gb = _reference(features, sizes, "max", scale, shift, relu, grad_output)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])
    gx, gs, gb = kernels.multiscale_pool_backward(grad_output, features, sizes, "max", scale, shift, relu)
    torch.testing.assert_close(gx[0], ref_gx[0], **TOL[torch.float64])
    torch.testing.assert_close(gs, ref_gs, **TOL[torch.float64])
    torch.testing.assert_close(gb, ref_gb, **TOL[torch.float64])


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_bins_larger_than_one_tile(mode):
    """Bins of 40 x 33 = 1320 elements take several BLOCK_K steps: ties and NaNs meet in
    the running per-lane state (positions p and p + 1024 share a lane)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-1, 2, (2, 2, 40, 33), generator=g).double()
    x.view(2, 2, -1)[0, 0, 5] = float("nan")
    x.view(2, 2, -1)[0, 0, 5 + 1024] = float("nan")
    x.view(2, 2, -1)[1, 1, 1030] = float("nan")
    x.view(2, 2, -1)[1, 0, [3, 3 + 1024]] = 5.0     # tied global maxima in one lane (scale 1)
    x.view(2, 2, -1)[0, 1, [7, 7 + 1024]] = -5.0    # ... and (scale -2)
    features, sizes = [x], [1, 2]
    scale = torch.tensor([1.0, -2.0], dtype=torch.float64)
    shift = torch.tensor([0.5, 0.0], dtype=torch.float64)
    out = kernels.multiscale_pool_forward(features, sizes, mode, scale, shift, False)
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=g)
    ref_out, ref_gx, ref_gs, ref_gb = _reference(features, sizes, mode, scale, shift, False, grad_output)
    torch.testing.assert_close(out, ref_out, equal_nan=True, **TOL[torch.float64])
    gx, gs, gb = kernels.multiscale_pool_backward(grad_output, features, sizes, mode, scale, shift, False)
    torch.testing.assert_close(gx[0], ref_gx[0], equal_nan=True, **TOL[torch.float64])
    torch.testing.assert_close(gs, ref_gs, equal_nan=True, **TOL[torch.float64])
    torch.testing.assert_close(gb, ref_gb, equal_nan=True, **TOL[torch.float64])
    if mode == "max":   # NaN-free planes: the global max's gradient (size 1) lands on the first tie
        assert gx[0].view(2, 2, -1)[1, 0, 3] != 0 and gx[0].view(2, 2, -1)[0, 1, 7] != 0


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_nan_propagates_like_torch(mode):
    """A NaN in a bin gives NaN (max: the last NaN of the bin wins, and gets the gradient)."""
    features, scale, shift = _inputs([(2, 3, 7, 5)], torch.float64, seed=4)
    features[0][0, 0, 1, 1] = float("nan")
    features[0][0, 0, 2, 3] = float("nan")
    features[0][1, 2, 6, 4] = float("nan")
    sizes = [1, 2, 3, 9]
    out = kernels.multiscale_pool_forward(features, sizes, mode, scale, shift, False)
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref_out, ref_gx, ref_gs, ref_gb = _reference(features, sizes, mode, scale, shift, False, grad_output)
    assert out.isnan().any()
    torch.testing.assert_close(out, ref_out, equal_nan=True, **TOL[torch.float64])
    gx, gs, gb = kernels.multiscale_pool_backward(grad_output, features, sizes, mode, scale, shift, False)
    torch.testing.assert_close(gx[0], ref_gx[0], equal_nan=True, **TOL[torch.float64])
    torch.testing.assert_close(gs, ref_gs, equal_nan=True, **TOL[torch.float64])
    torch.testing.assert_close(gb, ref_gb, equal_nan=True, **TOL[torch.float64])


# --------------------------------------------------------------------------
# The registered op (torch.library custom op with autograd) and the backend switch


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
def test_registered_op_autograd_float32(dims, mode):
    shapes, sizes = PYRAMIDS[dims]
    features, scale, shift = _inputs(shapes, torch.float32, seed=20 + dims)
    xs = [x.clone().requires_grad_() for x in features]
    sc, sh = scale.clone().requires_grad_(), shift.clone().requires_grad_()
    out = torch.ops.medmtl.multiscale_pool_triton(xs, sizes, mode, sc, sh, True)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    out.backward(grad_output)
    ref_out, ref_gx, ref_gs, ref_gb = _reference(features, sizes, mode, scale, shift, True, grad_output)
    torch.testing.assert_close(out.detach(), ref_out, **TOL[torch.float32])
    for x, r in zip(xs, ref_gx):
        torch.testing.assert_close(x.grad, r, **TOL[torch.float32])
    torch.testing.assert_close(sc.grad, ref_gs, **TOL[torch.float32])
    torch.testing.assert_close(sh.grad, ref_gb, **TOL[torch.float32])


def test_registered_op_without_affine_float64():
    shapes, sizes = PYRAMIDS[2]
    features, _, _ = _inputs(shapes, torch.float64, seed=8)
    xs = [x.clone().requires_grad_() for x in features]
    out = torch.ops.medmtl.multiscale_pool_triton(xs, sizes, "max", None, None, False)
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out.backward(grad_output)
    ref_out, ref_gx, _, _ = _reference(features, sizes, "max", None, None, False, grad_output)
    torch.testing.assert_close(out.detach(), ref_out, **TOL[torch.float64])
    for x, r in zip(xs, ref_gx):
        torch.testing.assert_close(x.grad, r, **TOL[torch.float64])


def test_registered_op_opcheck():
    shapes, sizes = PYRAMIDS[2]
    features, scale, shift = _inputs(shapes, torch.float64, seed=10)
    xs = [x.requires_grad_() for x in features]
    torch.library.opcheck(torch.ops.medmtl.multiscale_pool_triton.default,
                          (xs, sizes[:2], "avg", scale.requires_grad_(), shift.requires_grad_(), True))


def test_torch_compile_fullgraph_with_triton_backend():
    """The triton op traces into a compiled graph without breaks, forward and backward."""
    shapes, sizes = PYRAMIDS[2]
    features, scale, shift = _inputs(shapes, torch.float32, seed=11)

    def head(xs, sc, sh):
        return medmtl.ops.multiscale_pool(xs, sizes, "avg", sc, sh, "relu").square().sum()

    channels = [x.shape[1] for x in features]
    results = {}
    for backend in ("reference", "triton"):
        xs = [x.clone().requires_grad_() for x in features]
        sc = [s.clone().requires_grad_() for s in scale.split(channels)]
        sh = [s.clone().requires_grad_() for s in shift.split(channels)]
        with medmtl.ops.backend(backend):
            fn = torch.compile(head, fullgraph=True, backend="aot_eager") if backend == "triton" else head
            out = fn(xs, sc, sh)
        results[backend] = (out, torch.autograd.grad(out, xs + sc + sh))
    torch.testing.assert_close(results["triton"][0], results["reference"][0], **TOL[torch.float32])
    for got, expected in zip(results["triton"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _layouts(dims, seed):
    """Non-contiguous (permuted, strided) and channels-last levels of a pyramid."""
    g = torch.Generator().manual_seed(seed)
    if dims == 2:
        permuted = torch.randn(2, 5, 7, 3, generator=g, dtype=torch.float64).permute(0, 3, 2, 1)   # (2, 3, 7, 5)
        strided = torch.randn(2, 4, 9, 6, generator=g, dtype=torch.float64)[:, ::2, ::2]            # (2, 2, 5, 6)
        last = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
    else:
        permuted = torch.randn(2, 3, 4, 5, 3, generator=g, dtype=torch.float64).permute(0, 4, 3, 2, 1)
        strided = torch.randn(2, 4, 3, 6, 3, generator=g, dtype=torch.float64)[:, ::2, :, 1::2]    # (2, 2, 3, 3, 3)
        last = torch.randn(2, 3, 3, 4, 2, generator=g, dtype=torch.float64).to(
            memory_format=torch.channels_last_3d)
    features = [permuted, strided, last]
    assert not any(x.is_contiguous() for x in features)
    return features


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
def test_backend_triton_noncontiguous_and_channels_last(dims, mode, monkeypatch):
    """medmtl.ops.multiscale_pool under backend("triton"), per-level scale/shift lists,
    non-contiguous inputs; checks that the Triton launchers really ran."""
    calls = []
    for name in ("multiscale_pool_forward", "multiscale_pool_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    features = _layouts(dims, seed=30 + dims)
    sizes = [1, 3, 4] if dims == 3 else [1, 2, 3, 9]
    g = torch.Generator().manual_seed(31)
    scale = [torch.randn(x.shape[1], generator=g, dtype=torch.float64, requires_grad=True) for x in features]
    shift = [torch.randn(x.shape[1], generator=g, dtype=torch.float64, requires_grad=True) for x in features]
    xs = [x.detach().requires_grad_() for x in features]   # same strides, own .grad
    assert not any(x.is_contiguous() for x in xs)
    with medmtl.ops.backend("triton"):
        out = medmtl.ops.multiscale_pool(xs, sizes, mode, scale, shift, "relu")
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=g)
    out.backward(grad_output)
    assert calls == ["multiscale_pool_forward", "multiscale_pool_backward"]

    ref_xs = [x.detach().requires_grad_() for x in features]
    ref_scale = [p.detach().clone().requires_grad_() for p in scale]
    ref_shift = [p.detach().clone().requires_grad_() for p in shift]
    ref_out = reference.multiscale_pool(ref_xs, sizes, mode, ref_scale, ref_shift, "relu")
    ref_out.backward(grad_output)
    torch.testing.assert_close(out.detach(), ref_out.detach(), **TOL[torch.float64])
    for a, b in zip(xs + scale + shift, ref_xs + ref_scale + ref_shift):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])


# --------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 and sm_90




def test_aot_list_covers_every_launch_configuration(monkeypatch):
    """Records each kernel launch of the launchers (kernel, constexprs, pointer dtypes)
    over every dtype, mode, and forward tile, and checks aot_kernels() lists it."""
    launched = triton_aot.record_launches(monkeypatch, kernels, [
        "multiscale_pool_forward_kernel",
        "multiscale_pool_backward_gather_kernel",
        "multiscale_pool_backward_finish_kernel"])
    # Bins of at most 2, 12, 35, 225 and 289 elements reach every forward BLOCK_K.
    cases = [([(1, 1, 7, 5)], [9, 2, 1]), ([(1, 1, 15, 15)], [1]), ([(1, 1, 17, 17)], [1])]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for mode in ("avg", "max"):
            for shapes, sizes in cases:
                features, scale, shift = _inputs(shapes, dtype, seed=0)
                out = kernels.multiscale_pool_forward(features, sizes, mode, scale, shift, True)
                kernels.multiscale_pool_backward(torch.ones_like(out), features, sizes, mode, None, None, False)
    triton_aot.check_covers(kernels, launched)


def test_aot_compile_sm80_sm90(tmp_path):
    """Every kernel configuration compiles for sm_80 and sm_90 within the shared memory."""
    triton_aot.check(triton_aot.start("medmtl.kernels.multiscale_pool", tmp_path), kernels)
