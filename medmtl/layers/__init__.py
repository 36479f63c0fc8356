"""Drop-in nn.Modules over medmtl's fused ops (state_dicts match the plain modules)."""

from medmtl.layers.dilated_feature_enhancement import DilatedFeatureEnhancement
from medmtl.layers.multiscale_pool import MultiScalePool

__all__ = ["DilatedFeatureEnhancement", "MultiScalePool"]
