"""The private PyTorch ops the cpu backend calls (oneDNN's fused convolutions,
csrc/cpu/private_ops.h): their schemas are checked once at load; the
installed torch passes, and a schema that differs (forced with the test hook
MEDMTL_TEST_SCHEMA_MISMATCH, read at load, so in a fresh process) makes the
kernels take the public path with the same results, and `medmtl info` say why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medmtl._extension import private_op_fallbacks
from tests.conftest import requires_extension

pytestmark = requires_extension

ROOT = Path(__file__).resolve().parent.parent
FUSED = "mkldnn::_convolution_pointwise"

# Runs a float32 multi_dilation_conv on a map large enough for oneDNN (43x41,
# dilations that take no Winograd tiles), forward and backward, in a fresh
# process; prints the fallbacks, how many fused oneDNN convolutions ran, the
# output and the gradients, and `medmtl info`.
SCRIPT = r"""
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
import medmtl
from medmtl._extension import private_op_fallbacks
from medmtl.info import info
from medmtl.ops import multi_dilation_conv
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 6, 43, 41, generator=g).to(memory_format=torch.channels_last).requires_grad_()
w = (torch.randn(3, 5, 6, 3, 3, generator=g) / 3).requires_grad_()
b = torch.randn(5, generator=g)
with profile(activities=[ProfilerActivity.CPU]) as prof, medmtl.backend("cpu"):
    sums = multi_dilation_conv(x, w, [0, 5, 13], b, "sum", "relu")
    cats = multi_dilation_conv(x, w, [0, 5, 13], None, "concat", None)
gx, gw = torch.autograd.grad(sums.sum() + cats.square().sum(), [x, w])
fused = sum(e.name.startswith("mkldnn::_convolution_pointwise") for e in prof.events())
print(json.dumps({"fallbacks": private_op_fallbacks(), "fused_calls": fused, "info": info(),
                  "values": [t.detach().double().flatten().tolist() for t in (sums, cats, gx, gw)]}))
"""


def _run(mismatch: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MEDMTL_TEST_SCHEMA_MISMATCH"}
    if mismatch is not None:
        env["MEDMTL_TEST_SCHEMA_MISMATCH"] = mismatch
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_installed_torch_passes_the_schema_checks():
    assert private_op_fallbacks() == []


@pytest.fixture(scope="module")
def normal_run() -> dict:
    return _run(None)


def test_fused_convolutions_run_when_the_schemas_match(normal_run):
    assert normal_run["fallbacks"] == []
    assert normal_run["fused_calls"] > 0
    assert "private torch ops (oneDNN fused convolutions): used" in normal_run["info"]


@pytest.mark.parametrize("op,full_name", [(FUSED, FUSED), (FUSED + "_", FUSED + "_.binary")])
def test_a_schema_mismatch_takes_the_public_path(normal_run, op, full_name):
    import torch

    run = _run(op)
    assert len(run["fallbacks"]) == 1, run["fallbacks"]
    assert run["fallbacks"][0].startswith(full_name + ": schema differs"), run["fallbacks"]
    assert "expected `" in run["fallbacks"][0] and "found `" in run["fallbacks"][0]
    assert run["fused_calls"] == 0  # neither fused op runs without the other
    assert "not used, the public path instead:" in run["info"] and run["fallbacks"][0] in run["info"]
    for got, want in zip(run["values"], normal_run["values"]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4)
