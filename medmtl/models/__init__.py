"""The multi-task models: ResFormerMTL, UMS-Rep and FT-MTL-Net on medmtl's fused layers.

    model = medmtl.models.create_model("resformer_mtl", seg_classes=4, num_classes=3)
    out = model(x)                 # {"seg": (B, 4, H, W), "cls": (B, 3)}
    print(model.summary(224))      # parameters per part and head, multiply-adds per task
"""

from medmtl.models.base import MultiTaskModel
from medmtl.models.detection import decode_detections, encode_targets
from medmtl.models.ft_mtl_net import FTMTLNet, ft_mtl_net
from medmtl.models.optimize import fold_batch_norms, optimize
from medmtl.models.registry import create_model, list_models, register_model
from medmtl.models.resformer import ResFormerMTL, resformer_mtl
from medmtl.models.summary import ModelSummary
from medmtl.models.ums_rep import UMSRep, ums_rep

__all__ = [
    "FTMTLNet",
    "ModelSummary",
    "MultiTaskModel",
    "ResFormerMTL",
    "UMSRep",
    "create_model",
    "decode_detections",
    "encode_targets",
    "fold_batch_norms",
    "ft_mtl_net",
    "list_models",
    "optimize",
    "register_model",
    "resformer_mtl",
    "ums_rep",
]
