"""Run configurations: YAML files checked against one typed schema.

    config = load_config("configs/resformer_mtl.yaml", overrides=["train.epochs=3", "data.img_size=96"])
    config.model["name"], config.data.img_size, config.train.lr, config.output_dir
    save_config(config, "runs/x/config.yaml")        # the resolved config, every key written

A file has these sections (every key optional; defaults below):

    name: resformer_mtl            # the run's name (output_dir defaults to runs/<name>)
    output_dir: runs/resformer_mtl
    model:                         # model.name and the model's constructor arguments
      name: resformer_mtl
      in_channels: 1
      ...
    data: {root: synthetic, img_size: 64, ...}           # DataConfig
    train: {epochs: 20, batch_size: 8, lr: 0.001, ...}   # medmtl.engine.TrainConfig

A key that the schema does not have is an error naming it and listing the
valid keys at its level; a value of the wrong type names the key, the type
expected and the value. Model arguments are checked against the model
constructor's signature and annotations.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medmtl.engine.trainer import TrainConfig


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    """Where the images come from.

    root: "synthetic" (medmtl.data.SyntheticLesions) or a folder in
        medmtl.data.FolderDataset's layout.
    img_size: side of the square the images are resized to (folders) or made at (synthetic).
    channels: image channels (synthetic: 1 or 3; folders: 1 or 3 converts, null keeps the files').
    train_split, val_split, test_split: FolderDataset splits (a folder's splits/ lists, or
        train/val by val_fraction); for synthetic data they name seeds seed, seed+1, seed+2.
    train_size, val_size, test_size: synthetic images per split.
    noise, noise_level: synthetic noise ("gaussian", "poisson", "speckle", "mixed") for denoising.
    augment: random flips and rotations of the training split.
    normalize: per-image zero-mean unit-variance intensities (folders of raw scanner values).
    """

    root: str = "synthetic"
    img_size: int = 64
    channels: int | None = 1
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = 0.2
    train_size: int = 400
    val_size: int = 100
    test_size: int = 200
    noise: str | None = None
    noise_level: float = 0.1
    augment: bool = False
    normalize: bool = False


@dataclass
class RunConfig:
    """One run: what to train, on what, how, and where to write it."""

    name: str = "run"
    output_dir: str | None = None
    model: dict = field(default_factory=lambda: {"name": "resformer_mtl"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or os.path.join("runs", self.name))


# -- type checking -----------------------------------------------------------------------------------------

def _type_name(annotation) -> str:
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        base = "list" if origin in (list, tuple, Sequence) else getattr(origin, "__name__", str(origin))
        return f"{base} of {_type_name(args[0])}" if args else base
    if annotation is inspect.Parameter.empty:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(key: str, value, annotation):
    """value as `annotation` wants it (YAML lists become tuples for sequences; an int
    is a float); raises ConfigError naming key otherwise."""
    if annotation in (inspect.Parameter.empty, typing.Any):
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
    elif annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif annotation is list or origin in (list, tuple, Sequence) or annotation in (tuple, Sequence):
        if isinstance(value, (list, tuple)):
            args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
            items = [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
            return items if (annotation is list or origin is list) else tuple(items)
    else:
        return value  # a type this schema does not check (the constructor will)
    raise ConfigError(f"config key {key}: expected {_type_name(annotation)}, got {value!r} "
                      f"({type(value).__name__})")


def _unknown(key_path: str, key: str, valid) -> ConfigError:
    where = f"in {key_path}" if key_path else "at the top level"
    return ConfigError(f"unknown config key {key!r} {where}; valid keys: {', '.join(sorted(valid))}")


def _dataclass_from(cls, values, key_path: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config key {key_path}: expected a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(key_path, key, fields)
        kwargs[key] = _coerce(f"{key_path}.{key}", value, hints[key])
    return cls(**kwargs)


def model_arguments(name: str) -> dict[str, inspect.Parameter]:
    """The constructor arguments of the registered model `name` (with resolved annotations)."""
    from medmtl.models import list_models
    from medmtl.models.registry import model_class

    if name not in list_models():
        raise ConfigError(f"config key model.name: expected one of {list_models()}, got {name!r}")
    cls = model_class(name)
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    return {k: p.replace(annotation=hints.get(k, inspect.Parameter.empty))
            for k, p in params.items() if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def _check_model(values) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"config key model: expected a mapping with 'name' and the model's arguments, "
                          f"got {values!r}")
    if "name" not in values:
        raise ConfigError("config key model.name is missing (one of medmtl.models.list_models())")
    arguments = model_arguments(values["name"])
    checked = {"name": values["name"]}
    for key, value in values.items():
        if key == "name":
            continue
        if key not in arguments:
            raise _unknown("model", key, ["name", *arguments])
        checked[key] = _coerce(f"model.{key}", value, arguments[key].annotation)
    return checked


def config_from_dict(values: dict) -> RunConfig:
    """Checks a parsed YAML mapping against the schema (see the module docstring)."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(values).__name__}")
    top = {f.name for f in dataclasses.fields(RunConfig)}
    for key in values:
        if key not in top:
            raise _unknown("", key, top)
    config = RunConfig(
        name=_coerce("name", values.get("name", "run"), str),
        output_dir=_coerce("output_dir", values.get("output_dir"), str | None),
        model=_check_model(values.get("model", {"name": "resformer_mtl"})),
        data=_dataclass_from(DataConfig, values.get("data", {}), "data"),
        train=_dataclass_from(TrainConfig, values.get("train", {}), "train"))
    try:
        config.train.check()
    except ValueError as error:
        raise ConfigError(str(error).replace("TrainConfig: ", "config key train.")) from None
    return config


def config_to_dict(config: RunConfig) -> dict:
    """Every key of config as plain YAML values (tuples as lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {"name": config.name, "output_dir": str(config.run_dir), "model": plain(config.model),
            "data": plain(dataclasses.asdict(config.data)), "train": plain(dataclasses.asdict(config.train))}


def parse_override(text: str) -> tuple[list[str], object]:
    """"train.lr=0.01" -> (["train", "lr"], 0.01); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"an override must look like section.key=value (e.g. train.epochs=5), got {text!r}")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"an override's key must be dotted names (e.g. train.epochs), got {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None
    return path, value


def apply_override(values: dict, path: list[str], value) -> None:
    node = values
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    return values or {}


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The config of `path` (None: the defaults) with `overrides` ("section.key=value") applied,
    checked. Errors name the file."""
    values = read_yaml(path) if path is not None else {"model": {"name": "resformer_mtl"}}
    for text in overrides:
        apply_override(values, *parse_override(text))
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from None


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
