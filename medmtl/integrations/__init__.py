"""accelerate(): medmtl's fused layers dropped into models people already use.

    model = medmtl.accelerate(model)          # a converted copy; inplace=True converts model itself
    for row in medmtl.accelerated_modules(model):
        print(row)                            # path, original class, replacement or reason

Families (each imported lazily, only when its library is already imported):
MONAI SwinUNETR / SwinTransformer blocks (2-D, 3-D), timm SwinTransformer v1
blocks, torchvision swin_t / swin_s / swin_b ShiftedWindowAttention, and
torchvision DeepLabV3's ASPP. See medmtl/integrations/api.py.
"""

from medmtl.integrations.api import FAMILIES, Conversion, accelerate, accelerated_modules

__all__ = ["FAMILIES", "Conversion", "accelerate", "accelerated_modules"]
