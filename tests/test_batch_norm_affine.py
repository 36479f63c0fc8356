"""batch_norm_as_affine (the BatchNorm a fused layer folds into its op) against nn.BatchNorm2d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medmtl.layers._batch_norm import batch_norm_as_affine


def _norm(momentum, affine, track):
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(4, momentum=momentum, affine=affine, track_running_stats=track).double()
    if affine:
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_(0, 0.3)
    if track:
        norm.running_mean.normal_(0, 0.3)
        norm.running_var.uniform_(0.5, 2.0)
    return norm


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_affine_matches_batch_norm(momentum, affine, track, layout, training):
    norm = _norm(momentum, affine, track).train(training)
    reference = copy.deepcopy(norm)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 2 + 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn(x.shape, dtype=x.dtype)
    params = [x] + list(norm.parameters())
    for _ in range(2):  # the second step sees the first's running statistics (and cumulative momentum)
        scale, shift = batch_norm_as_affine(norm, x)
        got = x * scale[:, None, None] + shift[:, None, None]
        expected = reference(x)
        torch.testing.assert_close(got, expected)
        got_grads = torch.autograd.grad(got, params, grad)
        expected_grads = torch.autograd.grad(expected, [x] + list(reference.parameters()), grad)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e)
        for (name, value), (_, ref_value) in zip(norm.state_dict().items(), reference.state_dict().items()):
            torch.testing.assert_close(value, ref_value, msg=lambda m: f"{name}: {m}")


def test_only_the_mean_or_the_scale_used():
    """A gradient reaching only the shift's mean term or only the scale still matches."""
    norm = _norm(0.1, True, True).train()
    reference = copy.deepcopy(norm)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    scale, _ = batch_norm_as_affine(norm, x)
    (got,) = torch.autograd.grad(scale.sum(), x)
    expected_scale = reference.weight * torch.rsqrt(x.var((0, 2, 3), correction=0) + reference.eps)
    (expected,) = torch.autograd.grad(expected_scale.sum(), x)
    torch.testing.assert_close(got, expected)


def test_gradcheck():
    norm = _norm(0.1, True, False).train()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: batch_norm_as_affine(norm, x), (x,))


def test_single_value_per_channel_rejected():
    norm = _norm(0.1, True, True).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_as_affine(norm, torch.randn(1, 4, 1, 1, dtype=torch.float64))
