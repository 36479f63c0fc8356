"""DilatedFeatureEnhancement against the plain composition of torch.nn modules it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import medmtl
from medmtl.layers import DilatedFeatureEnhancement
from medmtl.ops import multi_dilation_conv, spatial_attention
from tests.ties import tie_free_seed, tie_margin

BACKENDS = ["reference", "cpu"]


class PlainDFE(nn.Module):
    """What the layer computes, written with the layer's own submodules called as plain torch.nn."""

    def __init__(self, layer: DilatedFeatureEnhancement):
        super().__init__()
        self.layer = copy.deepcopy(layer)

    def forward(self, x):
        m = self.layer
        if m.variant == "sum":
            y = torch.relu(sum(branch(x) for branch in m.branches))
        else:
            y = torch.relu(m.fuse(torch.cat([branch(x) for branch in m.branches], 1)) + m.shortcut(x))
        if m.attention is not None:
            pooled = torch.cat([y.mean(1, keepdim=True), y.max(1, keepdim=True)[0]], 1)
            y = y * torch.sigmoid(m.attention(pooled))
        return y


def _layer(cin, cout, dilations, variant, attention=True, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = DilatedFeatureEnhancement(cin, cout, dilations, variant, attention).to(dtype)
    for bn in layer.modules():  # non-trivial affine and running statistics
        if isinstance(bn, nn.BatchNorm2d):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_(0, 0.3)
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return layer, PlainDFE(layer)


def _compare(layer, plain, x, backend, training, tol):
    layer.train(training)
    plain.train(training)
    with medmtl.backend(backend):
        got = layer(x)
    expected = plain(x)
    torch.testing.assert_close(got, expected, **tol)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9), dtype=expected.dtype)
    got_grads = torch.autograd.grad(got, [x] + list(layer.parameters()), grad)
    expected_grads = torch.autograd.grad(expected, [x] + list(plain.layer.parameters()), grad)
    for name, g, e in zip(["x"] + [n for n, _ in layer.named_parameters()], got_grads, expected_grads):
        torch.testing.assert_close(g, e, **tol, msg=lambda m: f"{name}: {m}")
    for key, value in plain.layer.state_dict().items():  # running statistics after the step
        torch.testing.assert_close(layer.state_dict()[key], value, **tol)


F64 = dict(atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["sum", "concat"])
@pytest.mark.parametrize("attention", [True, False])
def test_layer_matches_plain_modules(backend, training, variant, attention):
    layer, plain = _layer(5, 4, (6, 12, 18), variant, attention)
    x = torch.randn(2, 5, 14, 14, dtype=torch.float64, requires_grad=True)
    _compare(layer, plain, x, backend, training, F64)


@pytest.mark.parametrize("variant", ["sum", "concat"])
@pytest.mark.parametrize("shape,training", [((1, 3, 1, 1), False), ((2, 3, 1, 1), True), ((2, 3, 5, 7), True),
                                            ((1, 3, 5, 7), False)])
def test_odd_sizes_and_batch_one(variant, shape, training):
    layer, plain = _layer(3, 3, (1, 6, 18), variant)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    _compare(layer, plain, x, "cpu", training, F64)


def _tie_free_seed(cin, cout, dilations, variant, make_input, training, band):
    """A seed for _layer and _input whose float64 run of the plain modules keeps
    every ReLU input and the channel max's runner-up more than band (of each
    tensor's scale) from a tie, so that float32 comparisons of gradients
    cannot flip with the machine's rounding (tests/ties.py)."""
    def margin(seed):
        _, plain = _layer(cin, cout, dilations, variant, seed=seed)
        return tie_margin(plain.train(training), make_input(seed, torch.float64))
    return tie_free_seed(margin, band)


def _input(shape, seed, dtype=torch.float32, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_contiguous_input_float32(layout, training):
    # the float32 composition rounds pre-activations to about 1e-6 of their scale
    def make_input(seed, dtype=torch.float32):
        base = _input((2, 4, 9, 16), seed, dtype)
        return base.to(memory_format=torch.channels_last)[..., :8] if layout == "channels_last" else base[..., ::2]

    seed = _tie_free_seed(4, 4, (2, 6), "concat", make_input, training, band=1e-5)
    layer, plain = _layer(4, 4, (2, 6), "concat", dtype=torch.float32, seed=seed)
    x = make_input(seed).requires_grad_()
    _compare(layer, plain, x, "cpu", training, dict(atol=1e-4, rtol=1e-4))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["sum", "concat"])
def test_large_map_runs_channels_last_and_returns_the_input_layout(layout, training, variant):
    """From 40x40 the cpu layer converts x to channels-last once and runs every
    op there; the output comes back in x's layout, with the plain modules' values."""
    layer, plain = _layer(3, 4, (6, 12, 18), variant)
    x = torch.randn(2, 3, 41, 40, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with medmtl.backend("cpu"):
        out = copy.deepcopy(layer).train(training)(x)
    expected_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_format)
    _compare(layer, plain, x, "cpu", training, F64)


def test_large_map_compiles_channels_last():
    layer, plain = _layer(3, 3, (2, 9), "sum")
    x = torch.randn(2, 3, 40, 41, dtype=torch.float64, requires_grad=True)
    with medmtl.backend("cpu"):
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        (grad,) = torch.autograd.grad(got.square().sum(), x)
    expected = plain(x)
    torch.testing.assert_close(got, expected, **F64)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), x)[0], **F64)


@pytest.mark.parametrize("offset", [0.0, 20.0])
def test_sum_training_float32_with_offset_input(offset):
    """The sum variant's training path folds bn1 into the 1x1 convolution with
    bn1's batch statistics: still BatchNorm's answer in float32 when the input
    has a large mean against its spread."""
    # With the offset, BatchNorm's centring costs float32 about 5e-6 of the
    # pre-activations' scale: stay 3e-5 away from every ReLU and max tie.
    def make_input(seed, dtype=torch.float32):
        return _input((2, 6, 28, 28), seed, dtype, mean=offset, std=0.5)

    seed = _tie_free_seed(6, 5, (2, 6, 18), "sum", make_input, True, band=3e-5)
    layer, plain = _layer(6, 5, (2, 6, 18), "sum", dtype=torch.float32, seed=seed)
    truth = copy.deepcopy(plain).double().train()
    x = make_input(seed).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    layer.train()
    with medmtl.backend("cpu"):
        got = layer(x)
    expected = truth(x64)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got_grads = torch.autograd.grad(got, [x] + list(layer.parameters()), grad.float())
    expected_grads = torch.autograd.grad(expected, [x64] + list(truth.layer.parameters()), grad)
    # Against float64, to 1e-4 of each tensor's scale (at least 1): the
    # weight gradients sum 1568 products of inputs near 20 (the float32
    # composition itself is off by up to 2e-4 on a scale of 44).
    names = ["output", "x"] + [n for n, _ in layer.named_parameters()]
    for name, g, e in zip(names, [got, *got_grads], [expected, *expected_grads]):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(g.double(), e, atol=1e-4 * scale, rtol=0, msg=lambda m: f"{name}: {m}")
    for key, value in truth.layer.state_dict().items():  # running statistics after the step
        torch.testing.assert_close(layer.state_dict()[key].double(), value.double(), atol=1e-5, rtol=1e-5)


def test_state_dict_moves_both_ways():
    layer, _ = _layer(4, 6, (6, 12), "sum")
    keys = set(layer.state_dict())
    assert {"branches.0.0.weight", "branches.0.1.running_mean", "branches.1.2.weight", "branches.1.3.bias",
            "attention.weight"} <= keys
    plain = nn.ModuleDict(dict(
        branches=nn.ModuleList(nn.Sequential(nn.Conv2d(4, 6, 3, padding=d, dilation=d, bias=False),
                                             nn.BatchNorm2d(6), nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
                               for d in (6, 12)),
        attention=nn.Conv2d(2, 1, 7, padding=3, bias=False))).double()
    plain.load_state_dict(layer.state_dict())  # layer -> plain
    fresh = DilatedFeatureEnhancement(4, 6, (6, 12), "sum").double()
    fresh.load_state_dict(plain.state_dict())  # plain -> layer
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
    # The branch convolutions keep their Cin-innermost layout (the cpu
    # backend's tap GEMMs read them in place) through .double() and loading.
    for branch in fresh.branches:
        assert branch[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not branch[0].weight.is_contiguous()
    concat = DilatedFeatureEnhancement(4, 6, (6, 12), "concat", spatial_attention=False)
    assert set(concat.state_dict()) >= {"branches.0.0.weight", "branches.2.1.weight", "fuse.0.weight",
                                        "fuse.1.running_var", "shortcut.0.weight"}
    assert concat.branches[0][0].weight.shape == (6, 4, 1, 1) and concat.fuse[0].weight.shape == (6, 18, 3, 3)


@pytest.mark.parametrize("variant", ["sum", "concat"])
def test_torch_compile_fullgraph(variant):
    layer, plain = _layer(3, 3, (1, 4), variant)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    for training in (False, True):
        layer.train(training)
        plain.train(training)
        with medmtl.backend("cpu"):
            got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(got, plain(x), **F64)


@settings(max_examples=25, deadline=None)
@given(cin=st.integers(1, 4), cout=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
       dilations=st.lists(st.integers(1, 20), min_size=1, max_size=3), variant=st.sampled_from(["sum", "concat"]),
       training=st.booleans())
def test_layer_property(cin, cout, h, w, dilations, variant, training):
    layer, plain = _layer(cin, cout, dilations, variant)
    x = torch.randn(2, cin, h, w, dtype=torch.float64, requires_grad=True)
    _compare(layer, plain, x, "cpu", training, F64)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,words", [
    (dict(in_channels=0), "in_channels must be a positive int"),
    (dict(in_channels=4, out_channels=-1), "out_channels must be a positive int"),
    (dict(in_channels=4, dilations=(6, 0)), "dilations must be a non-empty sequence of positive ints"),
    (dict(in_channels=4, dilations=(6, 1.5)), "dilations must be a non-empty sequence of positive ints"),
    (dict(in_channels=4, dilations=()), "dilations must be a non-empty sequence of positive ints"),
    (dict(in_channels=4, variant="max"), "variant must be 'sum' or 'concat'"),
])
def test_layer_rejects_bad_config(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DilatedFeatureEnhancement(**kwargs)


@pytest.mark.parametrize("x,error,words", [
    (torch.randn(4, 5, 5), ValueError, "x must be 4-D"),
    (torch.randn(1, 3, 5, 5), ValueError, "x must have 4 channels"),
    (torch.ones(1, 4, 5, 5, dtype=torch.int64), TypeError, "floating dtype"),
    (torch.randn(1, 4, 5, 5, device="meta"), ValueError, "x is on meta"),
])
def test_layer_rejects_bad_input(x, error, words):
    with pytest.raises(error, match=words):
        DilatedFeatureEnhancement(4)(x)


X = torch.randn(2, 3, 5, 5)
W = torch.randn(2, 4, 3, 3, 3)


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("kwargs,error,words", [
    (dict(x=torch.randn(3, 5, 5), weight=W, dilations=[1, 2]), ValueError, "x must be 4-D"),
    (dict(x=X, weight=torch.randn(2, 4, 5, 3, 3), dilations=[1, 2]), ValueError, "weight's Cin (5) must equal"),
    (dict(x=X, weight=torch.randn(2, 4, 3, 5, 5), dilations=[1, 2]), ValueError, "(n, Cout, Cin, 3, 3)"),
    (dict(x=X, weight=W, dilations=[1]), ValueError, "one entry per branch of weight (2)"),
    (dict(x=X, weight=W, dilations=[1, -2]), ValueError, "dilations must be a sequence of ints >= 0"),
    (dict(x=X, weight=W, dilations=[1, 2.0]), ValueError, "dilations must be a sequence of ints >= 0"),
    (dict(x=X.long(), weight=W, dilations=[1, 2]), TypeError, "x must have a floating dtype"),
    (dict(x=X, weight=W.double(), dilations=[1, 2]), TypeError, "weight must have the dtype of x"),
    (dict(x=X, weight=W.to("meta"), dilations=[1, 2]), ValueError, "weight must be on the device of x"),
    (dict(x=X, weight=W, dilations=[1, 2], bias=torch.randn(8)), ValueError, "bias must have length 4"),
    (dict(x=X, weight=W, dilations=[1, 2], combine="mean"), ValueError, "combine must be 'sum' or 'concat'"),
    (dict(x=X, weight=W, dilations=[1, 2], activation="gelu"), ValueError, "activation must be None or 'relu'"),
])
def test_conv_op_rejects_bad_input(backend, kwargs, error, words):
    with medmtl.backend(backend), pytest.raises(error) as info:
        multi_dilation_conv(**kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("x,weight,error,words", [
    (torch.randn(3, 5, 5), torch.randn(1, 2, 7, 7), ValueError, "x must be 4-D"),
    (X, torch.randn(1, 2, 6, 6), ValueError, "(1, 2, K, K) with K odd"),
    (X, torch.randn(1, 3, 7, 7), ValueError, "(1, 2, K, K) with K odd"),
    (X.int(), torch.randn(1, 2, 7, 7), TypeError, "x must have a floating dtype"),
    (X, torch.randn(1, 2, 7, 7).double(), TypeError, "weight must have the dtype of x"),
])
def test_attention_op_rejects_bad_input(x, weight, error, words):
    with pytest.raises(error) as info:
        spatial_attention(x, weight)
    assert words in str(info.value)


@pytest.mark.parametrize("args,words", [
    ((X, W, [1], None, "sum", True), "one entry per branch"),
    ((X, W, [1, -1], None, "sum", True), "dilations must be ints >= 0"),
    ((X, W, [1, 2], torch.randn(3), "sum", True), "bias must be 1-D of length 4"),
    ((X, torch.randn(2, 4, 2, 3, 3), [1, 2], None, "sum", True), "weight's Cin (2) must equal"),
])
def test_compiled_conv_op_checks_its_inputs(args, words):
    if not medmtl._extension.extension_loaded():
        pytest.skip("medmtl._C is not built")
    with pytest.raises(RuntimeError, match=None) as info:
        torch.ops.medmtl.multi_dilation_conv(*args)
    assert words in str(info.value)


@pytest.mark.parametrize("variant", ["sum", "concat"])
def test_eval_fold_cache_follows_parameter_changes(variant):
    """A frozen layer reuses the folded weights, but not after a parameter or
    statistic is written in place or loaded."""
    layer, plain = _layer(3, 3, (1, 4), variant)
    layer.eval().freeze()
    plain.eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad(), medmtl.backend("cpu"):
        first = layer(x)
        assert layer._fold_entry is not None
        folded = layer._fold_entry[1]
        torch.testing.assert_close(layer(x), first)
        assert layer._fold_entry[1] is folded  # reused
        for module in (layer, plain.layer):
            module.branches[1][1].running_mean.add_(0.5)
            module.branches[0][0].weight.mul_(1.5)
        torch.testing.assert_close(layer(x), plain(x), **F64)
        layer.load_state_dict(plain.layer.state_dict())
        torch.testing.assert_close(layer(x), plain(x), **F64)


# --------------------------------------------------------------------------- the concat's ReLU

@pytest.mark.parametrize("count", [1, 7, 8, 9, 1000, 4099])
def test_mask_bits_round_trip(count):
    from medmtl.layers.dilated_feature_enhancement import _pack_bits, _unpack_bits
    flags = torch.rand(count, generator=torch.Generator().manual_seed(count)) > 0.5
    packed = _pack_bits(flags.clone())
    assert packed.dtype == torch.uint8 and packed.numel() == (count + 7) // 8
    assert torch.equal(_unpack_bits(packed, count), flags)
    assert torch.equal(_unpack_bits(packed, count, torch.float32), flags.float())
    # Bit k of byte i is flag 8 i + k.
    assert int(packed[0]) == sum(int(flags[k]) << k for k in range(min(8, count)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_concat_relu_matches_relu_of_cat(layout):
    """_ConcatReLU (the concat variant's branch ReLUs, applied once) is
    relu(cat(parts)) with torch.relu's gradient: zero where the output is
    <= 0 (exact zeros included), passed at NaN; each part's gradient comes
    back dense in its layout."""
    from medmtl.layers.dilated_feature_enhancement import _ConcatReLU
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, c, 5, 7, generator=g, dtype=torch.float64) for c in (3, 1, 4)]
    parts[0][0, 1, 2, 3] = float("nan")
    parts[2][1, 0, 4, 6] = 0.0
    if layout == "channels_last":
        parts = [p.contiguous(memory_format=torch.channels_last) for p in parts]
    parts = [p.requires_grad_() for p in parts]
    grad = torch.randn(2, 8, 5, 7, generator=g, dtype=torch.float64)
    got = _ConcatReLU.apply(*parts)
    expected = torch.relu(torch.cat(parts, 1))
    torch.testing.assert_close(got, expected, equal_nan=True)
    got_grads = torch.autograd.grad(got, parts, grad)
    expected_grads = torch.autograd.grad(expected, parts, grad)
    for p, gg, eg in zip(parts, got_grads, expected_grads):
        torch.testing.assert_close(gg, eg, atol=0, rtol=0)
        assert gg.stride() == torch.empty_like(p).stride()
    assert got_grads[0][0, 1, 2, 3] == grad[0, 1, 2, 3] and got_grads[2][1, 0, 4, 6] == 0


# --------------------------------------------------------------------------- fold caching is explicit

def _ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """The mean-teacher EMA update, through .data: the version counters do not move."""
    for t, s in zip(list(target.parameters()) + list(target.buffers()),
                    list(source.parameters()) + list(source.buffers())):
        if t.dtype.is_floating_point:
            t.data.mul_(decay).add_(s.data, alpha=1 - decay)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("variant", ["sum", "concat"])
def test_plain_eval_follows_an_ema_update_through_data(variant, backend):
    """Without freeze(), eval never reuses a fold across calls: after a .data EMA
    update (which bumps no version counter) the output follows the new weights."""
    teacher, _ = _layer(8, 8, (1, 4), variant, seed=0)
    student, _ = _layer(8, 8, (1, 4), variant, seed=1)
    teacher.eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    versions = [p._version for p in teacher.parameters()]
    with torch.no_grad(), medmtl.backend(backend):
        before = teacher(x)
        teacher(x)
        _ema_update(teacher, student, 0.5)
        assert [p._version for p in teacher.parameters()] == versions  # the write went around them
        expected = PlainDFE(teacher).eval()(x)
        got = teacher(x)
    assert expected.abs().max() > 0.1 and (before - expected).abs().max() > 1e-3  # the update shows
    torch.testing.assert_close(got, expected, **F64)


def test_frozen_layer_reuses_its_fold_until_unfrozen():
    """freeze() means "weights are frozen from here on": a .data write after it is
    not seen (documented), and unfreeze() or train() make eval fold again."""
    layer, _ = _layer(3, 3, (1, 4), "sum", seed=0)
    other, _ = _layer(3, 3, (1, 4), "sum", seed=1)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    layer.eval().freeze()
    assert layer.frozen
    with torch.no_grad(), medmtl.backend("cpu"):
        frozen_out = layer(x)
        _ema_update(layer, other, 0.0)
        torch.testing.assert_close(layer(x), frozen_out)  # the frozen fold, as documented
        expected = PlainDFE(layer).eval()(x)
        layer.unfreeze()
        torch.testing.assert_close(layer(x), expected, **F64)
        layer.freeze()
        layer(x)
        layer.train()
        assert not layer.frozen and layer._fold_entry is None
        layer.eval()
        _ema_update(layer, other, 0.5)
        torch.testing.assert_close(layer(x), PlainDFE(layer).eval()(x), **F64)


def test_optimize_freezes_the_fused_layers():
    model = nn.Sequential(_layer(3, 3, (1, 4), "concat")[0])
    fast = medmtl.optimize(model)
    assert fast[0].frozen and not model[0].frozen


def test_frozen_cache_keeps_key_and_fold_together_across_dtypes_and_threads():
    """One (key, fold) attribute: threads calling a frozen layer with float32 and
    float64 inputs at once each get the fold of their own dtype."""
    from concurrent.futures import ThreadPoolExecutor

    layer, plain = _layer(3, 3, (1, 4), "concat", attention=False)  # (the attention weight is not folded)
    layer.eval().freeze()
    xs = {dt: torch.randn(1, 3, 6, 6, dtype=torch.float64).to(dt) for dt in (torch.float32, torch.float64)}
    expected = {dt: PlainDFE(layer).eval()(x.double()) for dt, x in xs.items()}

    def call(k):
        dt = (torch.float32, torch.float64)[k % 2]
        with torch.no_grad(), medmtl.backend("cpu"):
            out = layer(xs[dt])
        assert out.dtype == dt
        torch.testing.assert_close(out.double(), expected[dt], atol=1e-4 if dt == torch.float32 else 1e-9,
                                   rtol=1e-4 if dt == torch.float32 else 1e-9)
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(call, range(16)))


def test_frozen_layer_with_inference_tensor_weights():
    """Weights made under inference_mode have no version counter: the frozen cache
    keys on them without reading one."""
    with torch.inference_mode():
        layer, plain = _layer(3, 3, (1, 4), "sum")
        layer.eval().freeze()
        x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
        with medmtl.backend("cpu"):
            first = layer(x)
            torch.testing.assert_close(layer(x), first)
        torch.testing.assert_close(first, PlainDFE(layer).eval()(x), **F64)
