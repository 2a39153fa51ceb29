"""Vision encoders: ViT-UHD (PVC), the global native-resolution baseline, resolution policy.

Importing this package registers the ``vit_uhd_*`` and ``vit_gne_*`` models with timm (:mod:`.registry`).
:func:`load_encoder` builds the encoder any supported checkpoint (MoonViT / released ViT-UHD folder, timm,
open_clip or HF SigLIP file) describes.
"""

from .pvc import POOLING_KINDS, WindowedTokenCompression, refine_patch_embed, window_major_order
from .registry import create_vit_uhd, encoder_from_state_dict, load_encoder
from .resize import ResolutionPolicy, preprocess
from .vit_uhd import EncoderOutput, ViTUHD, ViTUHDConfig, encoder_name
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
    "encoder_from_state_dict",
    "encoder_name",
    "load_base_weights",
    "load_encoder",
    "preprocess",
    "refine_patch_embed",
    "window_major_order",
]
