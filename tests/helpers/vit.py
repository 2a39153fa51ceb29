"""Reference encoders the vision tests compare ViT-UHD with: a stock timm SigLIP-style ViT of the tiny shape, and
its weights under Hugging Face ``SiglipVisionModel`` names."""

import timm
import torch


def timm_reference(**overrides) -> torch.nn.Module:
    """A stock timm SigLIP-style ViT of the tiny shape (MAP head included, as real checkpoints have)."""
    kwargs = dict(
        img_size=224,
        patch_size=14,
        embed_dim=64,
        depth=6,
        num_heads=2,
        mlp_ratio=4.0,
        class_token=False,
        no_embed_class=True,
        global_pool="map",
        num_classes=0,
        dynamic_img_size=True,
        act_layer="gelu_tanh",
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(**kwargs).eval()
    with torch.no_grad():  # non-trivial norms and biases so that parity checks every parameter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_layout(state: dict) -> dict:
    """The same weights under transformers' SiglipVisionModel names (q/k/v split)."""
    out = {}
    for key, value in state.items():
        if key == "patch_embed.proj.weight":
            out["vision_model.embeddings.patch_embedding.weight"] = value
        elif key == "patch_embed.proj.bias":
            out["vision_model.embeddings.patch_embedding.bias"] = value
        elif key == "pos_embed":
            out["vision_model.embeddings.position_embedding.weight"] = value[0]
        elif key.startswith("norm."):
            out["vision_model.post_layernorm." + key[5:]] = value
        elif key.startswith("blocks."):
            _, layer, rest = key.split(".", 2)
            prefix = f"vision_model.encoder.layers.{layer}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.clone()
            else:
                rest = rest.replace("norm1", "layer_norm1").replace("norm2", "layer_norm2")
                rest = rest.replace("attn.proj", "self_attn.out_proj")
                out[prefix + rest] = value
        else:
            out["vision_model.head." + key] = value
    return out
