"""Full-size FLUX.1-shaped random weights in the files' real layouts, for GPU benchmarks.

Timing does not depend on weight values, so random tensors in the exact shapes (and, for
the transformer, Black Forest Labs' original key layout that diffusers converts on load)
exercise the same code path as the real 34 GB of FLUX.1-dev.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fluxstack.comfy.sample_models import flux_shapes

DEV_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                   "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
       "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu",
          "bos_token_id": 193, "eos_token_id": 194, "pad_token_id": 194}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "is_encoder_decoder": False, "pad_token_id": 0, "eos_token_id": 1}


def bfl_transformer_shapes(guidance: bool, double: int = 19, single: int = 38) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a FLUX.1 checkpoint in Black Forest Labs' layout (flux/model.py)."""
    return flux_shapes(double, single, guidance)


def random_state(shapes: dict[str, tuple[int, ...]], device: str, dtype: Any, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(0.02)
        if key.endswith(("norm.scale", "norm.weight")) or "layer_norm" in key:
            t = torch.ones(shape, device=device)
        out[key] = t.to(dtype).cpu()
    return out


def module_shapes(model: Any, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip}


def write_configs(root: Path, transformer: dict[str, Any], scheduler: dict[str, Any]) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, T5Config

    with torch.device("meta"):
        FluxTransformer2DModel(**transformer).save_config(str(root / "transformer"))
        AutoencoderKL(**VAE).save_config(str(root / "vae"))
    CLIPTextConfig(**CLIP_L).save_pretrained(str(root / "text_encoder"))
    T5Config(**T5_XXL).save_pretrained(str(root / "text_encoder_2"))
    FlowMatchEulerDiscreteScheduler(**scheduler).save_config(str(root / "scheduler"))
    (root / "README").write_text(json.dumps({"note": "random full-size FLUX.1 shapes for benchmarks"}))
