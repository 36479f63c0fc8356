"""Drop-in nn.Modules over medmtl's fused ops (state_dicts match the plain modules)."""

from medmtl.layers.multiscale_pool import MultiScalePool

__all__ = ["MultiScalePool"]
