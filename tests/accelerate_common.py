"""Helpers of the accelerate() tests: the original module is the oracle, run
with the same weights, inputs and random seed as its converted copy."""

from __future__ import annotations

import copy

import torch
from torch import nn

import medmtl


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights that make every part of the computation visible: relative
    position bias tables of std 1 (their default std 0.02 would hide a bias read
    at the wrong offsets), LayerNorm / BatchNorm affine parameters away from 1
    and 0, BatchNorm running statistics away from (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def converted_count(model: nn.Module) -> int:
    return sum(row.converted for row in medmtl.accelerated_modules(model))


def output_tensor(out) -> torch.Tensor:
    """A model's output as one tensor (torchvision's segmentation models return a dict)."""
    if isinstance(out, dict):
        return torch.cat([v.flatten() for v in out.values()])
    if isinstance(out, (list, tuple)):
        return torch.cat([v.flatten() for v in out])
    return out


def run(model: nn.Module, x: torch.Tensor, train: bool, grads: bool, seed: int = 0):
    """(output, input gradient, {parameter: gradient}, {buffer: value}) of one
    forward (and backward of a fixed random weighting of the output)."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(grads)
    torch.manual_seed(seed)  # dropout / DropPath draws, the same for both models
    out = output_tensor(model(x))
    if not grads:
        return out.detach(), None, {}, {k: v.clone() for k, v in model.named_buffers()}
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weight).sum().backward()
    params = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), params, {k: v.clone() for k, v in model.named_buffers()}


def assert_same(original: nn.Module, x: torch.Tensor, *, dtype=torch.float32, train: bool = False,
                grads: bool = True, atol: float | None = None, min_converted: int = 1) -> nn.Module:
    """Converts a copy of original and checks its output, input gradient, every
    parameter's gradient and every buffer against the original's (float32:
    within atol of the largest magnitude; float64: 1e-9). Returns the converted copy."""
    original = copy.deepcopy(original).to(dtype)
    fused = medmtl.accelerate(original)
    assert converted_count(fused) >= min_converted
    x = x.to(dtype)
    want = run(original, x, train, grads)
    got = run(fused, x, train, grads)
    tol = atol if atol is not None else (2e-5 if dtype == torch.float32 else 1e-9)

    def close(name, a, b):
        assert a.shape == b.shape, f"{name}: shape {tuple(b.shape)} != {tuple(a.shape)}"
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        err = float((a - b).abs().max()) if a.numel() else 0.0
        assert err <= tol * scale, f"{name}: max abs difference {err} > {tol} * {scale}"

    close("output", want[0], got[0])
    if grads:
        close("input gradient", want[1], got[1])
        assert want[2].keys() == got[2].keys()
        assert len(want[2]) == len(list(original.parameters()))
        for k in want[2]:
            close(f"gradient of {k}", want[2][k], got[2][k])
    assert want[3].keys() == got[3].keys()
    for k in want[3]:
        if want[3][k].is_floating_point():
            close(f"buffer {k}", want[3][k], got[3][k])
        else:
            assert torch.equal(want[3][k], got[3][k]), k
    return fused


def assert_state_dict_both_ways(original: nn.Module, fused: nn.Module) -> None:
    """Same keys and shapes; the original's checkpoint loads strictly into the
    converted model and the converted model's into the original."""
    a, b = original.state_dict(), fused.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    source = copy.deepcopy(original)
    randomize_(source, seed=7)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    fused.load_state_dict(source.state_dict(), strict=True)
    back = copy.deepcopy(original)
    back.load_state_dict(fused.state_dict(), strict=True)
    for k, v in source.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k
        assert torch.equal(back.state_dict()[k], v), k
