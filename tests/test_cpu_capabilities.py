"""The CPU kernels' capability copies (csrc/cpu/cpu_capability.h): a portable
baseline build (x86-64-v2) with AVX2 and AVX-512 copies of the kernels chosen
at load. The copy in force is the best this CPU runs unless
MEDMTL_CPU_CAPABILITY forces a lower one (read at load: fresh processes); the
kernels' numerical tests pass under every copy this CPU runs; and no AVX
instruction is reachable outside the avx2 / avx512 copies, so the binary runs
on any x86-64-v2 CPU."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medmtl import _extension
from tests.conftest import requires_extension

pytestmark = requires_extension

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("default", "avx2", "avx512")
X86 = platform.machine().lower() in ("x86_64", "amd64")

# The kernels' numerical checks against the reference (forward, gradients,
# layouts), run again in a process per forced capability; without the
# float64 gradchecks, opchecks, torch.compile and property tests (slow, and
# they check what does not differ between the copies: registration, tracing,
# and the same loops as the float32 / float64 comparisons).
KERNEL_TESTS = ["tests/test_window_attention_cpu.py", "tests/test_multiscale_pool_cpu.py",
                "tests/test_winograd_cpu.py", "tests/test_multi_dilation_conv_cpu.py", "tests/test_op_layouts.py",
                "-k", "not gradcheck and not opcheck and not compile and not property"]


def _env(capability: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MEDMTL_CPU_CAPABILITY"}
    if capability is not None:
        env["MEDMTL_CPU_CAPABILITY"] = capability
    return env


def _loaded(capability: str | None) -> tuple[str, str, str]:
    code = "import medmtl._C as C; print(C.cpu_capability, C.cpu_capability_supported, C.cpu_capability_note, sep='|')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(capability), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return tuple(r.stdout.strip().split("|"))


def _supported() -> str:
    return _extension._C.cpu_capability_supported


def _runnable() -> list[str]:
    return list(ORDER[:ORDER.index(_supported()) + 1])


def test_best_supported_capability_in_force_by_default():
    if "MEDMTL_CPU_CAPABILITY" in os.environ:
        pytest.skip("MEDMTL_CPU_CAPABILITY is set for this run")
    in_force, supported, note = _loaded(None)
    assert in_force == supported == _supported() and note == ""
    if X86:  # every x86-64 CPU of the last decade has AVX2
        assert supported in ("avx2", "avx512")
    assert f"CPU kernels: {in_force} (this CPU supports {supported}" in _info()


def _info() -> str:
    from medmtl.info import info

    return info()


@pytest.mark.parametrize("capability", ORDER)
def test_forcing_a_capability(capability):
    in_force, supported, note = _loaded(capability)
    if capability in _runnable():
        assert in_force == capability
        assert note == ("" if capability == supported else f"forced by MEDMTL_CPU_CAPABILITY={capability}")
    else:  # more than the CPU runs: the best it runs, and why
        assert in_force == supported and "more than this CPU" in note


def test_an_unknown_capability_is_ignored_with_a_reason():
    in_force, supported, note = _loaded("avx9000")
    assert in_force == supported
    assert note == "MEDMTL_CPU_CAPABILITY=avx9000 ignored (expected default, avx2 or avx512)"


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_kernels_match_the_reference_under_a_forced_capability(capability):
    """The kernels' numerical tests in a process whose kernels are the `capability`
    copy (the avx512 copy, where the CPU has it, is what the rest of the suite runs)."""
    if capability not in _runnable():
        pytest.skip(f"this CPU does not run the {capability} copy")
    code = (f"import sys, pytest, medmtl._C as C; assert C.cpu_capability == {capability!r}, C.cpu_capability; "
            f"sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', *{KERNEL_TESTS!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(capability), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert re.search(r"\d+ passed", r.stdout), r.stdout[-2000:]


def _functions_using_vector_registers(library: str) -> dict[str, set[str]]:
    """Demangled function name -> the AVX register kinds (ymm, zmm) its instructions use."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True,
                         check=True).stdout
    used: dict[str, set[str]] = {}
    current = None
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            current = m.group(1)
            continue
        for kind in ("ymm", "zmm"):
            if current is not None and f"%{kind}" in line:
                used.setdefault(current, set()).add(kind)
    return used


@pytest.mark.skipif(not X86, reason="AVX copies are built on x86-64 only")
def test_avx_instructions_only_in_their_capability_copies():
    """The baseline code (everything but the medmtl::cap_avx2 / cap_avx512 copies,
    and the inline functions the linker shares between the copies) uses no AVX
    register: a CPU without AVX runs it. The avx2 copy uses ymm and no zmm; the
    avx512 copy uses zmm: each copy was compiled for its instructions."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) not found")
    used = _functions_using_vector_registers(_extension._C.__file__)
    outside = sorted(f for f in used if "cap_avx2" not in f and "cap_avx512" not in f)
    assert not outside, f"{len(outside)} functions outside the AVX copies use AVX registers: {outside[:10]}"
    avx2 = [kinds for f, kinds in used.items() if "cap_avx2" in f]
    avx512 = [kinds for f, kinds in used.items() if "cap_avx512" in f]
    assert avx2 and all(kinds == {"ymm"} for kinds in avx2)
    assert any("zmm" in kinds for kinds in avx512)
