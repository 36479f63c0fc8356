"""Numerics switches of the kernels: medmtl.set_flags(...) / medmtl.get_flags().

winograd: whether the cpu backend may compute dense 3x3 branches of
    multi_dilation_conv as Winograd F(4x4, 3x3) tiles (faster on large maps;
    in float32 about 1e-5 of max|y| off, several times a direct convolution's
    error: csrc/cpu/winograd_conv3x3.h, docs/layers.md). Default on; the
    environment variable MEDMTL_WINOGRAD=0 turns it off at load. Process-wide.
"""

from __future__ import annotations

from medmtl._extension import extension_loaded

FLAGS = ("winograd",)


def _c():
    from medmtl import _C

    return _C


def get_flags() -> dict[str, bool | None]:
    """The switches in force ({"winograd": True/False}, None where the extension is not built)."""
    return {"winograd": bool(_c().winograd_enabled()) if extension_loaded() else None}


def set_flags(winograd: bool | None = None) -> None:
    """Sets the switches given (None leaves one as it is); see the module docstring."""
    if winograd is not None:
        if not isinstance(winograd, bool):
            raise TypeError(f"set_flags: winograd must be True, False or None, got {winograd!r}")
        if extension_loaded():
            _c().set_winograd_enabled(winograd)
