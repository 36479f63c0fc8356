"""medmtl.accelerate(model) and medmtl.accelerated_modules(model).

Each family's converter (a module of this package, imported only when the
library it converts is already imported: a model built from it means it is)
provides:

    candidate(module) -> bool          a module of the library's class (subclasses too)
    converted(module) -> bool          a module this converter already converted
    check(module, path, modules) -> str | None
                                       why it cannot be converted exactly (from its
                                       structure and settings), or None
    probe_inputs(module) -> list[tuple] float64 inputs for the probe (below)
    probe_key(module) -> tuple         what selects the module's code path (one
                                       probe per key and accelerate() call)
    convert(module) -> None            converts it in place (same parameters,
                                       buffers and names)

A converter changes a module's class to a subclass of the original that
overrides one forward method, and may swap a child for a medmtl layer that
holds the same parameters under the same names, so the state_dict keys and
shapes stay the original's. Before converting, each module is probed: a
float64 copy of the original and a converted float64 copy run on random
inputs (the reference backend), and a module whose outputs differ is left
as it is with the difference as its reason. This guards against library
versions whose internals differ from what the converters were written for.
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from medmtl.ops.backends import backend

# family -> (library that must be imported, converter module)
FAMILIES: dict[str, tuple[str, str]] = {
    "monai_swin": ("monai", "medmtl.integrations.monai_swin"),
    "timm_swin": ("timm", "medmtl.integrations.timm_swin"),
    "torchvision_swin": ("torchvision", "medmtl.integrations.torchvision_swin"),
    "torchvision_aspp": ("torchvision", "medmtl.integrations.torchvision_aspp"),
}


@dataclass(frozen=True)
class Conversion:
    """One candidate module: converted (replacement set) or skipped (reason set)."""

    path: str
    family: str
    original: str
    replacement: str | None = None
    reason: str | None = None

    @property
    def converted(self) -> bool:
        return self.replacement is not None

    def __str__(self) -> str:
        where = self.path or "<model>"
        if self.converted:
            return f"{where}: {self.original} -> {self.replacement}"
        return f"{where}: {self.original} left as it is: {self.reason}"


def _loaded_converters(families: Iterable[str]):
    """(family, converter module) of the families whose library is imported."""
    out = []
    for family in families:
        library, module_name = FAMILIES[family]
        if library not in sys.modules:
            continue
        try:
            out.append((family, importlib.import_module(module_name)))
        except (ImportError, AttributeError):
            # A library version without the classes the converter was written for:
            # none of its modules can be recognised, so none is converted.
            continue
    return out


def _check_model(name: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: model must be a torch.nn.Module, got {type(model).__name__}")


def _check_include(include: object) -> tuple[str, ...]:
    if include is None:
        return tuple(FAMILIES)
    if isinstance(include, str) or not isinstance(include, Iterable):
        raise TypeError(f"accelerate: include must be None or a collection of family names {tuple(FAMILIES)}, "
                        f"got {include!r}")
    include = tuple(include)
    unknown = [f for f in include if f not in FAMILIES]
    if unknown:
        raise ValueError(f"accelerate: include has unknown families {unknown}; known: {tuple(FAMILIES)}")
    return include


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def accelerate(model: nn.Module, *, inplace: bool = False, include: Iterable[str] | None = None) -> nn.Module:
    """model with every supported submodule replaced by medmtl's fused equivalent.

    Args:
        model: any nn.Module (MONAI, timm, torchvision or a model of your own
            holding their modules).
        inplace: convert model itself; else (default) a deep copy is converted
            and model is left untouched.
        include: family names to convert (default: all of FAMILIES).

    Returns the converted model. Parameters, buffers and state_dict keys and
    shapes are the original's. What cannot be converted with identical results
    is left as it is; medmtl.accelerated_modules(model) lists every candidate
    with its replacement or the reason it was skipped.
    """
    _check_model("accelerate", model)
    if not isinstance(inplace, bool):
        raise TypeError(f"accelerate: inplace must be a bool, got {inplace!r}")
    families = _check_include(include)
    if not inplace:
        model = copy.deepcopy(model)
    converters = _loaded_converters(families)
    if not converters:
        return model
    modules = dict(model.named_modules(remove_duplicate=False))
    probed: dict[tuple, str | None] = {}
    for path, module in list(modules.items()):
        for _family, converter in converters:
            if converter.candidate(module) and not converter.converted(module):
                reason = converter.check(module, path, modules)
                if reason is None:
                    # One probe per code path (the converter's probe_key): it checks
                    # the library's code, not the weights.
                    key = (type(module), converter.probe_key(module))
                    if key not in probed:
                        probed[key] = _probe(converter, module)
                    reason = probed[key]
                if reason is None:
                    converter.convert(module)
                else:
                    module._medmtl_skip_reason = reason
                break
    return model


def _probe(converter, module: nn.Module) -> str | None:
    """None when a converted float64 copy of module gives the original's outputs
    on the converter's probe inputs (eval mode, reference backend), else why not."""
    try:
        original = copy.deepcopy(module).double().eval()
        fused = copy.deepcopy(module).double().eval()
        converter.convert(fused)
        tensors = list(module.parameters()) + list(module.buffers())
        device = tensors[0].device if tensors else torch.device("cpu")
        with torch.no_grad(), backend("reference"):
            for args in converter.probe_inputs(original):
                args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
                want, got = original(*args), fused(*args)
                scale = max(1.0, float(want.abs().max()))
                if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-7, atol=1e-7 * scale):
                    diff = float((got - want).abs().max()) if got.shape == want.shape else "shape"
                    shape = tuple(args[0].shape)
                    return (f"probe: the converted module's output differs from the original's on input "
                            f"{shape} (max abs difference {diff}): this library version's module does not "
                            f"compute what the converter was written for")
    except Exception as error:  # a module the converter cannot even run is left alone, with the reason
        return f"probe failed: {type(error).__name__}: {error}"
    return None


def accelerated_modules(model: nn.Module) -> list[Conversion]:
    """Every module of model that a converter recognises, in model order: a
    Conversion with its replacement class when converted, else the reason it
    is left as it is."""
    _check_model("accelerated_modules", model)
    converters = _loaded_converters(FAMILIES)
    modules = dict(model.named_modules(remove_duplicate=False))
    rows = []
    for path, module in modules.items():
        for family, converter in converters:
            if not converter.candidate(module):
                continue
            if converter.converted(module):
                original = type(module).__mro__[1]  # the fused classes subclass the original directly
                rows.append(Conversion(path, family, f"{original.__module__}.{original.__qualname__}",
                                       _class_name(module)))
            else:
                reason = getattr(module, "_medmtl_skip_reason", None) or converter.check(module, path, modules) \
                    or "convertible, not converted (accelerate() was not applied to it, or include left it out)"
                rows.append(Conversion(path, family, _class_name(module), reason=reason))
            break
    return rows
