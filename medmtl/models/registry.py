"""The model registry, timm-style: @register_model, create_model(name, **kwargs), list_models()."""

from __future__ import annotations

from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a model constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"register_model: a model named {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the registered model `name` with the constructor's keyword arguments."""
    if not isinstance(name, str) or name not in _MODELS:
        raise ValueError(f"create_model: name must be one of {list_models()}, got {name!r}")
    return _MODELS[name](**kwargs)


def model_class(name: str) -> type:
    """The class the registered constructor `name` returns (its return annotation), whose
    __init__ holds the model's arguments."""
    import typing

    if not isinstance(name, str) or name not in _MODELS:
        raise ValueError(f"model_class: name must be one of {list_models()}, got {name!r}")
    cls = typing.get_type_hints(_MODELS[name]).get("return")
    if not isinstance(cls, type):
        raise TypeError(f"model_class: the constructor {name!r} has no class as its return annotation")
    return cls
