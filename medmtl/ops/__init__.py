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
from medmtl.ops.multiscale_pool import multiscale_pool

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend",
    "get_backend",
    "multiscale_pool",
    "reference",
    "resolve_backend",
    "set_backend",
]
