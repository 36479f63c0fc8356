"""Builds medmtl and its extension medmtl._C.

The C++ CPU kernels are always built (OpenMP, -O3). The CUDA kernels are built
when torch is a CUDA build and nvcc is found; MEDMTL_BUILD_CUDA=0|1 forces
either. Arches come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
Install: pip install --no-build-isolation -e .
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _want_cuda(torch_cuda_version: str | None) -> bool:
    forced = os.environ.get("MEDMTL_BUILD_CUDA")
    nvcc_found = bool(os.environ.get("CUDA_HOME")) or shutil.which("nvcc") is not None
    if forced is not None:
        if forced not in ("0", "1"):
            sys.exit(f"MEDMTL_BUILD_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and torch_cuda_version is None:
            sys.exit("MEDMTL_BUILD_CUDA=1 but the installed torch is a CPU-only build")
        return forced == "1"
    return torch_cuda_version is not None and nvcc_found


def _cuda_home_from_nvcc() -> None:
    """Points CUDA_HOME at the toolkit behind `nvcc` (which may be a wrapper script)."""
    if os.environ.get("CUDA_HOME") or shutil.which("nvcc") is None:
        return
    nvcc = Path(shutil.which("nvcc")).resolve()
    text = nvcc.read_text(errors="ignore") if nvcc.stat().st_size < 4096 else ""
    for token in text.split():
        if token.endswith("/bin/nvcc") and Path(token).exists():
            os.environ["CUDA_HOME"] = str(Path(token).parent.parent)
            return
    os.environ["CUDA_HOME"] = str(nvcc.parent.parent)


def _extensions():
    import torch

    _cuda_home_from_nvcc()  # before cpp_extension reads CUDA_HOME at import
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = _want_cuda(torch.version.cuda)
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-DMEDMTL_WITH_CUDA=" + ("1" if with_cuda else "0")]
    # The CPU kernels are memory-bound loops the compiler vectorizes: build for
    # the CPU this runs on (the extension is built where it is installed).
    # MEDMTL_CPU_ARCH="" (or e.g. x86-64-v2) builds a portable binary.
    cpu_arch = os.environ.get("MEDMTL_CPU_ARCH", "native")
    if cpu_arch:
        cxx_flags.append(f"-march={cpu_arch}")
    include_dirs = [str(ROOT / "csrc")]
    kwargs = dict(extra_link_args=["-fopenmp"])
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        cxx_flags.append(f'-DMEDMTL_CUDA_ARCHS="{archs}"')
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        # torch's headers include cusparse.h, cublas_v2.h ...: those come with
        # torch's nvidia-* wheels.
        import nvidia

        for base in nvidia.__path__:
            for sub in ("cu13/include", "cuda_runtime/include", "cublas/include", "cusparse/include"):
                if (Path(base) / sub).is_dir():
                    include_dirs.append(str(Path(base) / sub))
        ext = CUDAExtension(
            "medmtl._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--use_fast_math"]},
            **kwargs,
        )
    else:
        ext = CppExtension("medmtl._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
