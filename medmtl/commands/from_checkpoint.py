"""A trained model back from its checkpoint, with the run config it was trained under.

    config, model, label_names = load_trained("runs/resformer_mtl/checkpoint_best.pth")
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from medmtl.commands.build import build_model
from medmtl.config import ConfigError, RunConfig, config_from_dict, read_yaml
from medmtl.engine.checkpoint import load_checkpoint


def load_trained(checkpoint: str | Path) -> tuple[RunConfig, nn.Module, list[str]]:
    """(the run's config, the model with the checkpoint's weights in eval mode, label names).
    The config is the checkpoint's own (medmtl train writes it there), else the
    config.yaml beside it."""
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{checkpoint} is not a medmtl checkpoint (no 'model' entry)")
    metadata = state.get("metadata") or {}
    values = metadata.get("run_config")
    if values is None:
        beside = checkpoint.parent / "config.yaml"
        if not beside.is_file():
            raise ValueError(f"{checkpoint} carries no run config and there is no config.yaml beside it; "
                             f"it was not written by `medmtl train`")
        values = read_yaml(beside)
    try:
        config = config_from_dict(values)
    except ConfigError as error:
        raise ValueError(f"{checkpoint}: its run config does not fit this medmtl: {error}") from None
    model = build_model(config.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{checkpoint}: the weights do not fit the model of its config: {error}") from None
    return config, model.eval(), list(metadata.get("label_names") or [])
