"""Functional ops of medmtl, registered with torch.library (namespace `medmtl`)."""

from medmtl.ops import reference
from medmtl.ops.backends import (
    BACKENDS,
    BackendUnavailableError,
    backend,
    get_backend,
    resolve_backend,
    set_backend,
)
from medmtl.ops.multi_dilation_conv import multi_dilation_conv
from medmtl.ops.multiscale_pool import multiscale_pool
from medmtl.ops.spatial_attention import spatial_attention
from medmtl.ops.window_attention import window_attention

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend",
    "get_backend",
    "multi_dilation_conv",
    "multiscale_pool",
    "reference",
    "resolve_backend",
    "set_backend",
    "spatial_attention",
    "window_attention",
]
