"""Bad input to multiscale_pool gets an error that names the argument, on every backend."""

from __future__ import annotations

import pytest
import torch

import medmtl
from medmtl.layers import MultiScalePool
from medmtl.ops import multiscale_pool
from tests.conftest import requires_extension

X = torch.randn(2, 3, 5, 5)
Y = torch.randn(2, 4, 3, 3)

BAD_CALLS = [
    # (kwargs, error type, words the message must contain)
    (dict(features=[]), ValueError, "features must be a non-empty list"),
    (dict(features=X), TypeError, "wrap a single tensor in a list"),
    (dict(features=[X, torch.randn(3, 4, 3, 3)]), ValueError, "features[1] must have the batch size"),
    (dict(features=[torch.randn(2, 3, 5)]), ValueError, "features[0] must be 4-D"),
    (dict(features=[X, torch.randn(2, 3, 4, 4, 4)]), ValueError, "features[1] must be 4-D"),
    (dict(features=[torch.ones(2, 3, 5, 5, dtype=torch.int64)]), TypeError, "floating dtype"),
    (dict(features=[X, Y.double()]), TypeError, "features[1] must have the dtype"),
    (dict(features=[torch.randn(2, 3, 0, 5)]), ValueError, "non-empty channel and spatial"),
    (dict(features=[X], output_sizes=[]), ValueError, "output_sizes"),
    (dict(features=[X], output_sizes=[0]), ValueError, "output_sizes"),
    (dict(features=[X], output_sizes=[2.5]), ValueError, "output_sizes"),
    (dict(features=[X], mode="median"), ValueError, "mode must be 'avg' or 'max', got 'median'"),
    (dict(features=[X], activation="gelu"), ValueError, "activation must be None or 'relu'"),
    (dict(features=[X, Y], scale=[torch.ones(3)]), ValueError, "scale must be None or a list of 2"),
    (dict(features=[X, Y], scale=[torch.ones(3), torch.ones(3)]), ValueError, "scale[1] must be 1-D of length 4"),
    (dict(features=[X], shift=[torch.ones(3, 1)]), ValueError, "shift[0] must be 1-D of length 3"),
    (dict(features=[X], shift=[torch.ones(3, dtype=torch.float64)]), TypeError, "shift[0] must have the features' dtype"),
    (dict(features=[X], scale=torch.ones(3)), ValueError, "scale must be None or a list"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "auto"])
@pytest.mark.parametrize("kwargs,error,words", BAD_CALLS)
def test_functional_rejects_bad_input(backend, kwargs, error, words):
    with medmtl.backend(backend), pytest.raises(error) as info:
        multiscale_pool(**kwargs)
    assert words in str(info.value)


@requires_extension
@pytest.mark.parametrize("args,words", [
    # the dispatcher itself refuses an empty list: it has no tensor to pick a kernel by
    (([], [1], "avg", None, None, False), "no tensor arguments"),
    (([X, torch.randn(3, 4, 3, 3)], [1], "avg", None, None, False), "features[1] must have the batch size"),
    (([torch.randn(2, 3, 5)], [1], "avg", None, None, False), "features[0] must be 4-D"),
    (([torch.ones(2, 3, 5, 5, dtype=torch.int32)], [1], "avg", None, None, False), "floating dtype"),
    (([X], [0], "avg", None, None, False), "output_sizes must hold positive ints"),
    (([X], [1], "mean", None, None, False), "mode must be 'avg' or 'max'"),
    (([X, Y], [1], "avg", torch.ones(3), None, False), "scale must be 1-D of length 7"),
    (([X], [1], "avg", None, torch.ones(3, dtype=torch.float64), False), "shift must have the features' dtype"),
])
def test_compiled_op_checks_its_inputs(args, words):
    """torch.ops.medmtl.* called directly raises too, instead of reading out of bounds."""
    with pytest.raises((RuntimeError, NotImplementedError)) as info:
        torch.ops.medmtl.multiscale_pool(*args)
    assert words in str(info.value)


@requires_extension
def test_compiled_backward_checks_grad_shape():
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \(2, 3\)"):
        torch.ops.medmtl.multiscale_pool_backward(torch.ones(2, 4), [X], [1], "avg", None, None, False)


@pytest.mark.parametrize("kwargs,words", [
    (dict(in_channels=[]), "in_channels must be a non-empty sequence"),
    (dict(in_channels=64), "in_channels must be a non-empty sequence"),
    (dict(in_channels=[3], output_sizes=[-1]), "output_sizes"),
    (dict(in_channels=[3], mode="sum"), "mode must be"),
    (dict(in_channels=[3], activation="tanh"), "activation must be"),
    (dict(in_channels=[3], spatial_dims=1), "spatial_dims must be 2 or 3"),
])
def test_layer_rejects_bad_config(kwargs, words):
    with pytest.raises(ValueError, match=words):
        MultiScalePool(**kwargs)


def test_layer_rejects_wrong_levels():
    layer = MultiScalePool([3, 4])
    with pytest.raises(ValueError, match="expected 2 feature levels, got 1"):
        layer([X])
    with pytest.raises(ValueError, match=r"features\[1\] must have shape \(B, 4, \*, \*\)"):
        layer([X, torch.randn(2, 5, 3, 3)])
