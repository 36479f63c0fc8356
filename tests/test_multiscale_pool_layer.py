"""MultiScalePool against the plain composition of torch.nn modules it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medmtl
from medmtl.layers import MultiScalePool

BACKENDS = ["reference", "cpu"]


class PlainMultiScalePool(nn.Module):
    """What MultiScalePool computes, as plain modules: BN -> ReLU -> adaptive pools -> cat."""

    def __init__(self, in_channels, output_sizes, mode, spatial_dims):
        super().__init__()
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.norms = nn.ModuleList(bn(c) for c in in_channels)
        self.output_sizes, self.mode, self.dims = output_sizes, mode, spatial_dims

    def forward(self, features):
        pool = getattr(F, f"adaptive_{self.mode}_pool{self.dims}d")
        out = []
        for norm, x in zip(self.norms, features):
            y = torch.relu(norm(x))
            out += [pool(y, s).flatten(1) for s in self.output_sizes]
        return torch.cat(out, 1)


def _pair(in_channels, sizes, mode, dims, seed=0):
    torch.manual_seed(seed)
    layer = MultiScalePool(in_channels, sizes, mode, spatial_dims=dims)
    plain = PlainMultiScalePool(in_channels, sizes, mode, dims)
    for norm in layer.norms:  # non-trivial affine and running statistics
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_(0, 0.3)
        norm.running_mean.normal_(0, 0.3)
        norm.running_var.uniform_(0.5, 2.0)
    plain.load_state_dict(layer.state_dict())
    return layer, plain


CASES = [([4, 3], [(2, 4, 9, 7), (2, 3, 5, 5)], (1, 2, 3), 2),
         ([3], [(2, 3, 5, 4, 6)], (1, 2), 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("in_channels,shapes,sizes,dims", CASES, ids=["2d", "3d"])
def test_layer_matches_plain_modules(backend, training, mode, in_channels, shapes, sizes, dims):
    # In float64: the BatchNorm's output (batch statistics in training) feeds
    # the ReLU and the max, and in float32 the layer's and the plain modules'
    # roundings could put a value on either side of a kink or a runner-up on
    # either side of the max (tests/ties.py); the float32 kernels are compared
    # with the reference at the op level, away from ties.
    layer, plain = _pair(in_channels, sizes, mode, dims)
    layer.double().train(training)
    plain.double().train(training)
    features = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    with medmtl.backend(backend):
        got = layer(features)
    expected = plain(features)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(expected)
    got_grads = torch.autograd.grad(got, features + list(layer.parameters()), grad)
    expected_grads = torch.autograd.grad(expected, features + list(plain.parameters()), grad)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)
    # running statistics after the step, and the step counter
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value, atol=1e-12, rtol=1e-12, msg=key)
    if training:
        assert int(layer.norms[0].num_batches_tracked) == 1


def test_cumulative_momentum_matches_batchnorm():
    layer, plain = _pair([3], (1,), "avg", 2)
    for norm in list(layer.norms) + list(plain.norms):
        norm.momentum = None
    for step in range(3):
        x = torch.randn(4, 3, 6, 6) * (step + 1)
        with medmtl.backend("cpu"):
            layer(x.split(3, 1))
        plain([x])
    torch.testing.assert_close(layer.state_dict(), plain.state_dict())


def test_state_dict_round_trip_and_eval_output():
    layer, plain = _pair([4, 3], (1, 2), "avg", 2, seed=3)
    fresh = MultiScalePool([4, 3], (1, 2))
    fresh.load_state_dict(copy.deepcopy(plain.state_dict()))
    back = PlainMultiScalePool([4, 3], (1, 2), "avg", 2)
    back.load_state_dict(fresh.state_dict())
    fresh.eval()
    back.eval()
    features = [torch.randn(2, 4, 7, 7), torch.randn(2, 3, 4, 4)]
    torch.testing.assert_close(fresh(features), back(features))
    assert list(fresh.state_dict()) == list(plain.state_dict())


def test_layer_without_norm_or_activation():
    layer = MultiScalePool([3], (1, 2), norm=False, activation=None)
    assert len(layer.state_dict()) == 0
    x = torch.randn(2, 3, 6, 6)
    expected = torch.cat([x.mean((2, 3)), F.adaptive_avg_pool2d(x, 2).flatten(1)], 1)
    torch.testing.assert_close(layer([x]), expected)
    assert layer.out_features == 3 * 5


def test_training_with_one_value_per_channel_is_refused_like_batchnorm():
    layer = MultiScalePool([3])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer([torch.randn(1, 3, 1, 1)])


def test_resformer_head_shape():
    """BN -> ReLU -> GAP of the 512- and 256-channel levels, concatenated: 768 features."""
    head = MultiScalePool([512, 256]).eval()
    out = head([torch.randn(2, 512, 14, 14), torch.randn(2, 256, 28, 28)])
    assert out.shape == (2, 768) and head.out_features == 768
    assert (out >= 0).all()
