"""`make gpu-check` (.ci/gpu_check.py) on a machine without a GPU: it says so,
skips the build, the GPU tests and the benchmark, lists the GPU tests, writes
its report and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import GPU_PRESENT

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason=f"{GPU_PRESENT}: checks the path without one")
def test_gpu_check_without_a_gpu(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, ".ci/gpu_check.py", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu-check: no GPU" in done.stdout and "skipping the CUDA build, the GPU tests" in done.stdout
    report = (out / "report.md").read_text()
    for step in ("build", "gpu tests", "gpu bench"):
        assert f"| {step} | skipped: no GPU |" in report
    assert "| gpu tests (list only) | passed |" in report
    # the listed GPU tests include the compiled Triton and CUDA checks of every op
    listing = (out / "gpu-tests-list-only.log").read_text()
    for name in ("test_cuda_backend_matches_reference", "test_triton_backend_compiled_matches_reference",
                 "test_cuda_matches_reference"):
        assert name in listing
    assert "test_harness_on_the_cpu_backend" not in listing
