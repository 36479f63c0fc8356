"""Building the CUDA kernels' code against the CPU emulation in tests/cuda_emulation:
the launch-syntax rewrite, constant overrides for small-limit builds, and the
search for usable CUDA headers. Shared by the *_cuda_emulated tests."""

from __future__ import annotations

import glob
import os
import re
import site
import subprocess
import sysconfig
from pathlib import Path

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
