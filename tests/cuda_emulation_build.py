"""Building the CUDA kernels' code against the CPU emulation in tests/cuda_emulation:
the launch-syntax rewrite, constant overrides for small-limit builds, the
search for usable CUDA headers, the g++ build of a driver with a copy of the
kernels ("real" and "small" limits), and the ctypes wrapper of what every
driver exports (tests/cuda_emulation/driver_common.h). Shared by the
*_cuda_emulated tests."""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import site
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
EMULATION = TESTS / "cuda_emulation"
CSRC = TESTS.parent / "csrc"
BUILDS = ("real", "small")  # the kernels as they are, and with the test's small limits

# The drivers' dtype codes (EMU_DISPATCH), and the kernels' accumulation dtype (acc_type).
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
ACC_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float64,
             torch.float16: torch.float32, torch.bfloat16: torch.float32}

CUDA_HEADERS = ("cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h")
LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_]\w*(?:\s*<[^<>;(){}]*>)?)\s*<<<(?P<config>[^;]*?)>>>\s*\(")


def rewrite_launches(source: str, path: Path) -> str:
    """`kernel<<<config>>>(` -> `::emu::launch("kernel", kernel, config)(`, every one of them."""
    expected = source.count("<<<")

    def launch(m: re.Match) -> str:
        kernel = " ".join(m["kernel"].split())
        return f'::emu::launch("{kernel}", {kernel}, {" ".join(m["config"].split())})('

    rewritten, count = LAUNCH.subn(launch, source)
    if count == 0 or count != expected or "<<<" in rewritten or ">>>" in rewritten:
        raise AssertionError(f"{path}: rewrote {count} kernel launches but the source has {expected} `<<<`; "
                             "update LAUNCH in this test to the launch syntax the kernels use")
    return rewritten


def set_constants(source: str, values: dict[str, int], path: Path) -> str:
    for name, value in values.items():
        pattern = re.compile(rf"(\bconstexpr\s+[\w:]+\s+{name}\s*=\s*)[^;]+;")
        source, count = pattern.subn(rf"\g<1>{value};", source)
        if count != 1:
            raise AssertionError(f"{path}: `constexpr ... {name} = ...;` matched {count} times, not once")
    return source


def find_cuda_include(cxx: str) -> tuple[Path | None, str]:
    """The first include dir with usable CUDA headers, or None and why not."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda*/include"))]
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:  # some virtualenvs
        pass
    for sp in map(Path, sorted(dirs)):
        candidates += sorted(sp.glob("nvidia/cu*/include")) + sorted(sp.glob("nvidia/cuda_runtime/include"))
    probe = "".join(f"#include <{h}>\n" for h in CUDA_HEADERS)
    problems = []
    for inc in dict.fromkeys(candidates):
        if not all((inc / h).is_file() for h in CUDA_HEADERS):
            continue
        r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-x", "c++", "-I", str(inc), "-"],
                           input=probe, capture_output=True, text=True)
        if r.returncode == 0:
            return inc, ""
        errors = [line for line in r.stderr.splitlines() if "error" in line] or ["does not compile"]
        problems.append(f"{inc}: {errors[0]}")
    where = "; ".join(problems) if problems else "none in CUDA_HOME, /usr/local/cuda*, site-packages/nvidia"
    return None, f"no usable CUDA headers ({', '.join(CUDA_HEADERS)}): {where}"


def prepare_sources(root: Path, files, small_limits: dict[str, dict[str, int]] | None = None) -> Path:
    """A copy of csrc/core and of `files` of csrc/cuda under root, the launches of the .cu
    files rewritten and the constants of small_limits (file name -> constant -> value)
    set; returns the copy's cuda dir."""
    shutil.copytree(CSRC / "core", root / "core")
    (root / "cuda").mkdir()
    for name in files:
        path = CSRC / "cuda" / name
        if path.suffix != ".cu" and name not in (small_limits or {}):
            shutil.copy(path, root / "cuda" / name)
            continue
        text = path.read_text()
        if path.suffix == ".cu":
            text = rewrite_launches(text, path)
        if name in (small_limits or {}):
            text = set_constants(text, small_limits[name], path)
        (root / "cuda" / name).write_text(text)
    return root / "cuda"


def build_emulations(root: Path, driver: str, files, small_limits: dict[str, dict[str, int]],
                     signatures: dict[str, tuple[list, object]], *,
                     parallel: bool = False) -> dict[str, EmulatedLibrary]:
    """Builds tests/cuda_emulation/`driver` with g++ against a copy of `files` (see
    prepare_sources) into root/libemu_<build>.so for each of BUILDS, the "small" one
    with small_limits, and loads them (see EmulatedLibrary); returns build -> library.
    Skips the calling test without g++ or usable CUDA headers. parallel: both
    compilers at once, else one at a time."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: cannot build the CUDA emulation")
    include, why = find_cuda_include(cxx)
    if include is None:
        pytest.skip(why)
    running = []
    for name in BUILDS:
        cuda_dir = prepare_sources(root / name, files, small_limits if name == "small" else None)
        cmd = [cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-fvisibility=hidden",
               "-Wl,-z,defs", "-Wall", "-Wno-unknown-pragmas", "-I", str(include), "-I", str(cuda_dir),
               "-I", str(EMULATION), str(EMULATION / driver), "-o", str(root / f"libemu_{name}.so")]
        running.append((name, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    text=True)))
        if not parallel:
            _wait_for(*running.pop())
    for build in running:
        _wait_for(*build)
    return {name: EmulatedLibrary(root / f"libemu_{name}.so", name, signatures) for name in BUILDS}


def _wait_for(name: str, cmd: list[str], proc: subprocess.Popen):
    log, _ = proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"building the {name} emulation failed:\n{' '.join(cmd)}\n{log[-6000:]}")


class EmulatedLibrary:
    """One build of a driver, loaded with ctypes (`.lib`): the entry points of every
    driver (emu_reset, emu_error, emu_log) and those of `signatures`, the driver's
    own (name -> (argtypes, restype))."""

    def __init__(self, path: Path, name: str, signatures: dict[str, tuple[list, object]]):
        self.name = name
        self.lib = ctypes.CDLL(str(path))
        common = {"emu_reset": ([ctypes.c_uint64], None), "emu_error": ([], ctypes.c_char_p),
                  "emu_log": ([], ctypes.c_char_p)}
        for fn, (argtypes, restype) in {**common, **signatures}.items():
            entry = getattr(self.lib, fn)
            entry.argtypes, entry.restype = argtypes, restype

    def launches(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """(kernel, grid, block) of the launches since the last reset."""
        out = []
        for line in self.lib.emu_log().decode().splitlines():
            *kernel, gx, gy, gz, bx, by, bz = line.split()
            out.append((" ".join(kernel), (int(gx), int(gy), int(gz)), (int(bx), int(by), int(bz))))
        return out

    def kernels(self) -> list[str]:
        """Kernel names of the launches since the last reset."""
        return [kernel for kernel, _, _ in self.launches()]

    def check(self, status: int, what: str):
        assert status == 0, f"{self.name}: {what} failed with cudaError {status}: {self.lib.emu_error().decode()}"
