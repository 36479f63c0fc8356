"""The suite's own rules (tests/conftest.py): under CI=true a skip fails unless it
is about the GPU, and the run ends with one line counting tests per backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SAMPLE = '''
import pytest
from tests.conftest import NO_GPU, GPU_PRESENT

def test_runs():
    pass

def test_tool_missing():
    pytest.skip("g++ not found: cannot build the CUDA emulation")

@pytest.mark.skipif(True, reason="triton is not installed")
def test_marker_skip():
    pass

def test_no_gpu():
    pytest.skip(f"{NO_GPU}: needs a CUDA GPU")

@pytest.mark.skipif(True, reason=f"{GPU_PRESENT}: checks the error raised without one")
def test_gpu_present():
    pass

@pytest.mark.gpu(backend="cuda")
def test_gpu_marker():
    pass
'''

MODULE_SKIP = '''
import pytest
pytest.importorskip("a_module_that_is_not_installed")

def test_never_collected():
    pass
'''


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-rA",
         "--continue-on-collection-errors",
         "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _lines(out: str, outcome: str, name: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(outcome) and name in line]


def test_skips_fail_under_ci_except_gpu_ones(tmp_path):
    done = _pytest(tmp_path, "true")
    out = done.stdout
    assert done.returncode != 0, out
    assert _lines(out, "FAILED", "test_tool_missing"), out
    assert _lines(out, "ERROR", "test_marker_skip"), out  # a skipif marker fails at setup
    assert _lines(out, "ERROR", "test_module_skip.py"), out  # a module-level importorskip
    assert "only GPU skips pass in CI" in out
    for name in ("test_no_gpu", "test_gpu_present", "test_gpu_marker", "test_runs"):
        assert not _lines(out, "FAILED", name), (name, out)
    assert "1 passed" in out


def test_skips_stay_skips_outside_ci_and_the_count_is_printed(tmp_path):
    done = _pytest(tmp_path, None)
    assert done.returncode == 0, done.stdout
    assert "1 passed" in done.stdout and "failed" not in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("medmtl tests passed per backend:")]
    assert lines == ["medmtl tests passed per backend: CPU 1, Triton interpreted 0, Triton AOT 0, "
                     "CUDA compiled 0, CUDA emulated 0, GPU 0"], done.stdout
