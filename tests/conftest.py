"""Shared helpers of the test suite, and its rules:

- Triton runs compiled where there is a CUDA GPU, and in its interpreter on CPU
  tensors where there is none (TRITON_INTERPRET=1, decided here before anything
  imports triton; an explicit TRITON_INTERPRET in the environment wins).
- Under CI=true every skip fails the run, except those for the presence or
  absence of a GPU (reasons starting with NO_GPU or GPU_PRESENT): a lost CUDA
  build, a missing triton or a missing compiler cannot pass CI silently.
- At the end, one line counts the tests that passed per backend.
"""

from __future__ import annotations

import os
import re

import torch

# torch.cuda.is_available() does not import triton (nor initialise CUDA).
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

import pytest  # noqa: E402

import medmtl  # noqa: E402
from medmtl._extension import extension_has_cuda, extension_loaded  # noqa: E402
from medmtl.ops.backends import triton_error  # noqa: E402
from tests.ties import kink_between, spaced_normal  # noqa: E402

# Skip reasons CI accepts (every other skip fails under CI=true).
NO_GPU = "no GPU"
GPU_PRESENT = "a GPU is present"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _allowed_skip(reason: str) -> bool:
    reason = re.sub(r"^Skipped:\s*", "", reason.strip())
    return reason.startswith((NO_GPU, GPU_PRESENT))


requires_extension = pytest.mark.skipif(
    not extension_loaded(), reason="medmtl._C is not built (pip install --no-build-isolation -e .)")
# A CUDA GPU, and the backend's kernels for it (reasons in pytest_collection_modifyitems).
requires_cuda_gpu = pytest.mark.gpu(backend="cuda")
requires_triton_gpu = pytest.mark.gpu(backend="triton")
requires_triton = pytest.mark.skipif(triton_error() is not None, reason=f"{triton_error()}")


def triton_device() -> torch.device:
    """Where the triton backend runs in this session: CPU tensors in the interpreter, else the GPU."""
    return torch.device("cpu") if TRITON_INTERPRETED else torch.device("cuda")


def pytest_addoption(parser):
    parser.addoption("--medmtl-backend", action="append", default=[], choices=BACKENDS,
                     help="run only the tests of this backend (repeatable; `make gpu-check` passes GPU)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu(backend): needs a CUDA GPU and the backend's kernels for it")


def _gpu_skip_reason(backend: str) -> str | None:
    if not HAS_GPU:
        return f"{NO_GPU}: needs a CUDA GPU (torch.cuda.is_available() is False)"
    if backend == "cuda" and not extension_has_cuda():
        return "medmtl._C was built without CUDA kernels (MEDMTL_BUILD_CUDA=1, nvcc and a CUDA torch)"
    if backend == "triton" and triton_error() is not None:
        return triton_error()
    return None


# The backend a test exercises, by its module and name (for the closing count).
BACKENDS = ("CPU", "Triton interpreted", "Triton AOT", "CUDA compiled", "CUDA emulated", "GPU")
_BACKEND_OF: dict[str, str] = {}   # test id -> backend
_PASSED: dict[str, int] = {}       # backend -> tests passed


def backend_of(item) -> str:
    module = item.path.name
    name = item.originalname or item.name
    if item.get_closest_marker("gpu") is not None:
        return "GPU"
    if "aot_compile" in name or module == "test_gpu_register_budget.py":
        return "Triton AOT"
    if module.endswith("_cuda_emulated.py"):
        return "CUDA emulated"
    if module == "test_cuda_backend.py":
        return "CUDA compiled"
    if module.endswith("_triton.py"):  # CPU tensors in the interpreter (skipped with a GPU)
        return "Triton interpreted"
    if "triton" in name or "triton" in item.name:  # on triton_device(): interpreted, or compiled on the GPU
        return "Triton interpreted" if TRITON_INTERPRETED else "GPU"
    return "CPU"


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--medmtl-backend")
    if wanted:
        config.hook.pytest_deselected(items=[item for item in items if backend_of(item) not in wanted])
        items[:] = [item for item in items if backend_of(item) in wanted]
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            reason = _gpu_skip_reason(marker.kwargs.get("backend", "any"))
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
        # The Triton modules' launcher tests run CPU tensors in the interpreter;
        # their ahead-of-time compiles run everywhere (no interpreter, no GPU).
        elif (item.path.name.endswith("_triton.py") and "aot_compile" not in item.name
              and not TRITON_INTERPRETED):
            item.add_marker(pytest.mark.skip(
                reason=(f"{GPU_PRESENT}: Triton runs compiled, and these tests run it on CPU tensors in its "
                        f"interpreter; tests/test_gpu_backends.py checks it compiled") if HAS_GPU else
                "TRITON_INTERPRET=0 without a GPU: the Triton kernels cannot run"))
        _BACKEND_OF[item.nodeid] = backend_of(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not _allowed_skip(reason):
            report.outcome = "failed"
            report.longrepr = f"CI=true: {collector.nodeid} would be skipped ({reason}); only GPU skips pass in CI"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not _allowed_skip(reason):
            report.outcome = "failed"
            report.longrepr = f"CI=true: {item.nodeid} would be skipped ({reason}); only GPU skips pass in CI"


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        backend = _BACKEND_OF.get(report.nodeid, "CPU")
        _PASSED[backend] = _PASSED.get(backend, 0) + 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = ", ".join(f"{name} {_PASSED.get(name, 0)}" for name in BACKENDS)
    terminalreporter.write_line(f"medmtl tests passed per backend: {counts}")


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts and ends with the `auto` backend, and the same global seed."""
    torch.manual_seed(0)
    medmtl.set_backend("auto")
    yield
    medmtl.set_backend("auto")
def make_features(shapes, dtype=torch.float32, layout="contiguous", seed=0, requires_grad=True,
                  device="cpu"):
    """Random levels of the given (B, C, *spatial) shapes.

    The values of a level are distinct and evenly spaced, shuffled
    (tests.ties.spaced_normal): a max never compares two values within
    rounding of each other, so no comparison of gradients depends on a tie.
    layout: "contiguous", "channels_last" or "strided" (a non-contiguous view:
    every other column of a wider tensor).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if layout == "strided":
            wide = spaced_normal((*shape[:-1], 2 * shape[-1]), g, dtype)
            x = wide[..., ::2]
            assert not x.is_contiguous()
        else:
            x = spaced_normal(shape, g, dtype)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        out.append(x.to(device).requires_grad_(requires_grad))
    return out


def make_affine(features, seed=1):
    """Per-level (scale, shift) of the features' dtype, leaves that take gradients.

    Each channel's shift puts the ReLU's kink of x * scale + shift halfway
    between two of its values (tests.ties.kink_between): no value rounds to
    either side of it.
    """
    g = torch.Generator().manual_seed(seed)
    scale = [(torch.rand(x.shape[1], generator=g, dtype=x.dtype) + 0.5) for x in features]
    shift = [kink_between(x, s, g).requires_grad_() for x, s in zip(features, scale)]
    return [s.requires_grad_() for s in scale], shift
