"""The three model families: shapes, training, gradients, backends, state_dicts, compile."""

from __future__ import annotations

import io

import pytest
import torch

import medmtl
from medmtl.models import list_models
from tests.conftest import requires_extension
from tests.model_configs import SMALL, batch, flat_outputs, small_model, toy_loss

MODELS = list(SMALL)


def test_registry_lists_the_three_families():
    assert list_models() == sorted(MODELS)
    with pytest.raises(ValueError, match="name must be one of"):
        medmtl.models.create_model("resnet50")


def _expected_shapes(model, n, size):
    shapes = {}
    for task in getattr(model, "active_tasks", model.tasks):
        if task == "seg":
            shapes["seg"] = (n, model.seg_classes, size, size)
        elif task == "cls":
            shapes["cls"] = (n, model.num_classes)
        elif task == "denoise":
            shapes["denoise"] = (n, model.in_channels, size, size)
        elif task == "det":
            s = size // 4
            shapes["det"] = {"heatmap": (n, model.det_classes, s, s), "size": (n, 2, s, s), "offset": (n, 2, s, s)}
    return shapes


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 3])
def test_output_shapes_at_two_sizes(name, n):
    model = small_model(name).eval()
    for size in SMALL[name][1]:
        out = model(batch(name, size, n))
        got = {k: ({a: tuple(b.shape) for a, b in v.items()} if isinstance(v, dict) else tuple(v.shape))
               for k, v in out.items()}
        assert got == _expected_shapes(model, n, size)


@pytest.mark.parametrize("name", MODELS)
def test_training_steps_reduce_the_loss_and_reach_every_parameter(name):
    model = small_model(name).train()
    x = batch(name, n=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss = toy_loss(model(x))
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"parameters without a gradient: {missing}"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", MODELS)
def test_eval_is_deterministic(name):
    model = small_model(name).eval()
    x = batch(name)
    first, second = flat_outputs(model(x)), flat_outputs(model(x))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_extension
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_reference_and_cpu_backends_agree(name, training):
    """Outputs and every gradient, in float64 (no float32 rounding can flip a
    ReLU or max between the backends: tests/ties.py)."""
    model = small_model(name, drop_path_rate=0.0) if name == "resformer_mtl" else small_model(name)
    model = model.double().train(training)
    x = batch(name, dtype=torch.float64).requires_grad_()
    results = {}
    for backend in ("reference", "cpu"):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with medmtl.backend(backend):
            out = model(x)
            loss = toy_loss(out)
            grads = torch.autograd.grad(loss, [x] + list(model.parameters()))
        results[backend] = (flat_outputs(out), grads)
        model.load_state_dict(state)  # the same running statistics for both
    for got, expected in zip(results["cpu"][0], results["reference"][0]):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    names = ["x"] + [n for n, _ in model.named_parameters()]
    for name_, got, expected in zip(names, results["cpu"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7, msg=lambda m: f"{name_}: {m}")


@requires_extension
@pytest.mark.parametrize("name", MODELS)
def test_state_dict_moves_across_backends(name, tmp_path):
    """Trained one step under cpu, saved, loaded (weights_only) into a fresh model: the
    same outputs under the reference backend."""
    model = small_model(name).train()
    with medmtl.backend("cpu"):
        toy_loss(model(batch(name, n=3))).backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.eval()
        expected = flat_outputs(model(batch(name)))
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    fresh = small_model(name, seed=5)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with medmtl.backend("reference"):
        got = flat_outputs(fresh.eval()(batch(name)))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@requires_extension
@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_forward(name):
    model = small_model(name).eval()
    x = batch(name)
    with medmtl.backend("cpu"):
        expected = flat_outputs(model(x))
        got = flat_outputs(torch.compile(model, backend="aot_eager")(x))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_summary_counts_parameters_and_multiply_adds(name):
    model = small_model(name)
    summary = model.summary(SMALL[name][1][0])
    assert summary.total_parameters == sum(p.numel() for p in model.parameters())
    assert sum(summary.parts.values()) + sum(summary.heads.values()) == summary.total_parameters
    assert set(summary.macs) == set(getattr(model, "active_tasks", model.tasks))
    assert all(m > 0 for m in summary.macs.values())
    text = str(summary)
    assert "multiply-adds" in text and f"{summary.total_parameters:,}" in text


def test_summary_defaults_of_a_model_without_declared_heads():
    """A MultiTaskModel that names no parts or heads: each top-level child is a
    shared part, and every task's multiply-adds are the whole forward's."""
    from torch import nn

    from medmtl.models import MultiTaskModel

    class Tiny(MultiTaskModel):
        all_tasks = ("cls",)

        def __init__(self):
            super().__init__()
            self.in_channels, self.tasks = 1, ("cls",)
            self.body = nn.Conv2d(1, 4, 3, bias=False)
            self.head = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return {"cls": self.head(self.body(x).mean((2, 3)))}

    summary = Tiny().summary(10)
    assert summary.parts == {"body": 36, "head": 8} and summary.heads == {"cls": 0}
    assert summary.macs == {"cls": 4 * 9 * 8 * 8 + 4 * 2}  # the 3x3 conv on 8x8 outputs, then the linear
