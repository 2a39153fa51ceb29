"""Vision encoders: ViT-UHD (PVC), the global native-resolution baseline, resolution policy.

Importing this package registers the ``vit_uhd_*`` and ``vit_gne_*`` models with timm.
"""

from .pvc import POOLING_KINDS, WindowedTokenCompression, refine_patch_embed, window_major_order
from .resize import ResolutionPolicy, preprocess
from .vit_uhd import EncoderOutput, ViTUHD, ViTUHDConfig, create_vit_uhd
from .weights import LoadReport, load_base_weights

__all__ = [
    "POOLING_KINDS",
    "EncoderOutput",
    "LoadReport",
    "ResolutionPolicy",
    "ViTUHD",
    "ViTUHDConfig",
    "WindowedTokenCompression",
    "create_vit_uhd",
    "load_base_weights",
    "preprocess",
    "refine_patch_embed",
    "window_major_order",
]
