"""Drop-in nn.Modules over medmtl's fused ops (state_dicts match the plain modules)."""

from medmtl.layers.dilated_feature_enhancement import DilatedFeatureEnhancement
from medmtl.layers.multiscale_pool import MultiScalePool
from medmtl.layers.window_attention import WindowAttention

__all__ = ["DilatedFeatureEnhancement", "MultiScalePool", "WindowAttention"]
