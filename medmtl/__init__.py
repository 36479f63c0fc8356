"""medmtl: multi-task medical image analysis with fused Triton, CUDA and C++ kernels.

    import medmtl
    medmtl.set_backend("cpu")            # or: with medmtl.backend("reference"): ...
    y = medmtl.ops.multiscale_pool([x3, x4], output_sizes=(1, 2, 3, 6))
    head = medmtl.layers.MultiScalePool([256, 512])
    print(medmtl.info())
    model = medmtl.accelerate(model)     # MONAI / timm / torchvision Swin and ASPP on the fused layers
    net = medmtl.models.create_model("resformer_mtl")   # {"seg", "cls"} from one forward
    fast = medmtl.optimize(net)          # BatchNorms folded, channels-last, for CPU inference
"""

from medmtl import layers, models, ops
from medmtl.info import info
from medmtl.integrations import accelerate, accelerated_modules
from medmtl.models import optimize
from medmtl.ops.backends import BackendUnavailableError, backend, get_backend, set_backend
from medmtl.ops.flags import get_flags, set_flags

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "accelerate",
    "accelerated_modules",
    "backend",
    "get_backend",
    "get_flags",
    "info",
    "layers",
    "models",
    "ops",
    "optimize",
    "set_backend",
    "set_flags",
]
