"""Choosing backends: names, scopes, the environment variable, errors that say why."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import medmtl
from medmtl.ops import BackendUnavailableError, multiscale_pool, resolve_backend
from medmtl.ops import backends as backend_module
from tests.conftest import GPU_PRESENT, requires_extension, requires_triton


def test_set_backend_and_scope_restore():
    medmtl.set_backend("reference")
    assert medmtl.get_backend() == "reference"
    with medmtl.backend("cpu"):
        assert medmtl.get_backend() == "cpu"
        with pytest.raises(RuntimeError):
            with medmtl.backend("triton"):
                assert medmtl.get_backend() == "triton"
                raise RuntimeError("leave the scope by an error")
        assert medmtl.get_backend() == "cpu"
    assert medmtl.get_backend() == "reference"


@pytest.mark.parametrize("name", ["gpu", "", None, "CPU"])
def test_unknown_backend_names_are_rejected(name):
    with pytest.raises(ValueError, match="backend must be one of auto, reference, cpu, cuda, triton"):
        medmtl.set_backend(name)
    with pytest.raises(ValueError, match="backend must be one of"):
        with medmtl.backend(name):
            pass


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_environment_variable_sets_the_default():
    done = _python("import medmtl; print(medmtl.get_backend())", MEDMTL_BACKEND="reference")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reference"


def test_bad_environment_variable_is_named():
    done = _python("import medmtl", MEDMTL_BACKEND="fastest")
    assert done.returncode != 0
    assert "MEDMTL_BACKEND must be one of" in done.stderr and "'fastest'" in done.stderr


def test_reference_backend_runs_the_reference():
    x = torch.randn(2, 3, 4, 4)
    with medmtl.backend("reference"):
        assert resolve_backend("multiscale_pool", x.device) == "reference"
        out = multiscale_pool([x], (1,))
    # the reference is autograd through plain torch ops, not a custom op
    torch.testing.assert_close(out, x.mean((2, 3)))


@pytest.mark.skipif(torch.cuda.is_available(), reason=f"{GPU_PRESENT}: checks the error raised without one")
def test_cuda_backend_without_gpu_says_why():
    with medmtl.backend("cuda"), pytest.raises(BackendUnavailableError) as info:
        multiscale_pool([torch.randn(1, 2, 3, 3)])
    message = str(info.value)
    assert "backend 'cuda' cannot run multiscale_pool" in message
    assert any(words in message for words in ("no CUDA GPU", "without CUDA kernels", "not built"))


@requires_triton
def test_triton_on_cpu_tensors_without_interpreter_says_why():
    done = _python(
        "import torch, medmtl\n"
        "with medmtl.backend('triton'):\n"
        "    medmtl.ops.multiscale_pool([torch.randn(1, 2, 3, 3)])", TRITON_INTERPRET="0")
    assert done.returncode != 0
    assert "BackendUnavailableError" in done.stderr and "TRITON_INTERPRET=1" in done.stderr


def test_missing_triton_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backend_module.importlib.util, "find_spec", lambda name: None)
    with medmtl.backend("triton"), pytest.raises(BackendUnavailableError, match="triton is not installed"):
        multiscale_pool([torch.randn(1, 2, 3, 3)])


def test_cpu_backend_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(backend_module, "extension_loaded", lambda: False)
    with medmtl.backend("cpu"), pytest.raises(BackendUnavailableError, match="pip install --no-build-isolation"):
        multiscale_pool([torch.randn(1, 2, 3, 3)])
    # auto falls back to the reference when the extension is missing
    assert resolve_backend("multiscale_pool", torch.device("cpu")) == "reference"


def test_auto_on_cuda_tensors_falls_back_to_reference_without_gpu_backends(monkeypatch):
    monkeypatch.setattr(backend_module, "GPU_PREFERENCE", {"multiscale_pool": ()})
    assert resolve_backend("multiscale_pool", torch.device("cuda")) == "reference"


def test_info_lists_build_and_backends():
    text = medmtl.info()
    assert "extension medmtl._C:" in text and "triton:" in text and "CUDA kernels:" in text
    for op in ("multiscale_pool", "multi_dilation_conv", "spatial_attention", "window_attention"):
        for name in ("reference", "cpu", "cuda", "triton"):
            assert re.search(rf"^{op} +{name} +(yes|no: .+)$", text, re.MULTILINE), (op, name)


def test_command_line_info():
    done = subprocess.run([sys.executable, "-m", "medmtl", "info"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "multiscale_pool" in done.stdout and "backend in force: auto" in done.stdout


def test_backend_scope_is_per_thread():
    """Two threads nest `with medmtl.backend(...)` with interleaved exits: each sees
    its own choice, and the process-wide one is left as it was. (With one global,
    thread A's exit would restore `auto` under thread B's block, and B's exit would
    then leave `reference`, A's choice, in force for good.)"""
    import threading

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[str]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def thread_a():
        try:
            with medmtl.backend("reference"):
                a_in.set()
                b_in.wait(10)
                seen["a"].append(medmtl.get_backend())
            a_out.set()
            seen["a"].append(medmtl.get_backend())
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)
            a_out.set()

    def thread_b():
        try:
            a_in.wait(10)
            with medmtl.backend("cpu"):
                b_in.set()
                a_out.wait(10)
                seen["b"].append(medmtl.get_backend())
            seen["b"].append(medmtl.get_backend())
        except BaseException as e:
            errors.append(e)
            b_in.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert seen == {"a": ["reference", "auto"], "b": ["cpu", "auto"]}
    assert medmtl.get_backend() == "auto"


def test_set_backend_is_process_wide_and_scopes_override_it_per_thread():
    import threading

    medmtl.set_backend("reference")
    seen = []
    with medmtl.backend("cpu"):
        thread = threading.Thread(target=lambda: seen.append(medmtl.get_backend()))
        thread.start()
        thread.join()
        assert medmtl.get_backend() == "cpu"
    assert seen == ["reference"]  # another thread sees the process-wide choice, not this block's
    assert medmtl.get_backend() == "reference"


@requires_extension
def test_torch_compile_guards_on_the_scoped_backend_per_thread():
    """A compiled function recompiles when the backend in force changes, also when
    the change is a `with medmtl.backend(...)` in another thread."""
    import threading

    graphs = []

    def record(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: multiscale_pool([x], (1,)), backend=record, fullgraph=True)
    x = torch.randn(1, 2, 3, 3)
    with medmtl.backend("reference"):
        compiled(x)
    used_op = []

    def in_thread():
        with medmtl.backend("cpu"):
            compiled(x)
        used_op.append(any("medmtl.multiscale_pool" in t for t in graphs[-1]))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert len(graphs) == 2, "no recompile for the other thread's backend"
    assert not any("medmtl" in t for t in graphs[0])
    assert used_op == [True]


@pytest.mark.parametrize("capability, arch_list, runs", [
    ((8, 0), "8.0;9.0+PTX", True),
    ((8, 6), "8.0;9.0+PTX", True),      # sm_80 SASS runs on 8.x with x >= 0
    ((9, 0), "8.0;9.0+PTX", True),
    ((10, 0), "8.0;9.0+PTX", True),     # Blackwell JIT-compiles the compute_90 PTX
    ((10, 0), "8.0;9.0", False),        # no PTX: no kernel image
    ((7, 5), "8.0;9.0+PTX", False),     # T4: older than every arch
    ((7, 0), "7.0+PTX;8.0", True),
    ((9, 0), "9.0a", True),
    ((10, 0), "9.0a", False),           # arch-specific SASS runs on its own capability only
    ((8, 9), "", False),
])
def test_arch_mismatch_follows_cuda_binary_compatibility(capability, arch_list, runs):
    reason = backend_module.arch_mismatch(capability, arch_list)
    assert (reason is None) == runs
    if not runs:
        assert f"compute capability {capability[0]}.{capability[1]}" in reason and "no kernel image" in reason


def test_auto_skips_cuda_on_a_gpu_the_extension_has_no_code_for(monkeypatch):
    """A T4 (sm_75) with the default 8.0;9.0+PTX build: auto warns once and takes triton
    (or the reference); asking for cuda explicitly raises with the reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(backend_module, "extension_loaded", lambda: True)
    monkeypatch.setattr(backend_module, "extension_has_cuda", lambda: True)
    monkeypatch.setattr(backend_module, "cuda_arch_list", lambda: "8.0;9.0+PTX")
    monkeypatch.setattr(backend_module, "triton_error", lambda: None)
    monkeypatch.setattr(backend_module, "_WARNED", set())
    device = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match=r"multiscale_pool on cuda:0 runs on backend 'triton', not 'cuda' "
                                            r"\(cuda: .*compute capability 7.5 \(no kernel image\)"):
        assert resolve_backend("multiscale_pool", device) == "triton"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op and device
        assert resolve_backend("multiscale_pool", device) == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_backend("window_attention", device) == "cuda"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with medmtl.backend("cuda"), pytest.raises(BackendUnavailableError, match="no kernel image"):
        resolve_backend("window_attention", device)
