"""Random-weight model files ComfyUI really loads, named like the shipped manifests' files.

ComfyUI fixes FLUX's head count (hidden size 3072) and uses fixed full-size T5-XXL/CLIP-L
configs, so the smallest store it can run end to end is a 1 double + 1 single block FLUX
(1.1 GB bf16) with full-size text encoders (T5-XXL stored in fp8, 4.9 GB). Tensors of one
shape share their random bytes, which keeps generation to seconds; values do not matter for
exercising the code paths. Every file is written under a temporary name and renamed when
complete, and test manifests with each file's size and sha256 are written beside the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from fluxstack.manifest import default_manifests_dir

H, HEAD_DIM, MLP = 3072, 128, 3072 * 4
T5 = {"d_model": 4096, "d_ff": 10240, "inner": 4096, "heads": 64, "layers": 24, "vocab": 32128}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768}
SIGLIP_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
              "image_size": 384, "patch_size": 14}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "layers_per_block": 2, "norm_num_groups": 32, "use_quant_conv": False, "use_post_quant_conv": False}
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp8": "F8_E4M3", "fp32": "F32"}

Shapes = dict[str, tuple[int, ...]]


def flux_shapes(double: int = 1, single: int = 1, guidance: bool = True) -> Shapes:
    """A FLUX.1 transformer in Black Forest Labs' key layout (what ComfyUI detects and diffusers
    converts); full size is 19 double + 38 single blocks, and schnell has no guidance embedder."""
    s: Shapes = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = (out_f, in_f), (out_f,)

    linear("img_in", H, 64)
    linear("txt_in", H, 4096)
    for emb, width in (("time_in", 256), ("vector_in", 768)) + ((("guidance_in", 256),) if guidance else ()):
        linear(f"{emb}.in_layer", H, width)
        linear(f"{emb}.out_layer", H, H)
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            linear(f"{p}_mod.lin", 6 * H, H)
            linear(f"{p}_attn.qkv", 3 * H, H)
            s[f"{p}_attn.norm.query_norm.scale"] = s[f"{p}_attn.norm.key_norm.scale"] = (HEAD_DIM,)
            linear(f"{p}_attn.proj", H, H)
            linear(f"{p}_mlp.0", MLP, H)
            linear(f"{p}_mlp.2", H, MLP)
    for i in range(single):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * H + MLP, H)
        linear(f"{p}.linear2", H, H + MLP)
        s[f"{p}.norm.query_norm.scale"] = s[f"{p}.norm.key_norm.scale"] = (HEAD_DIM,)
        linear(f"{p}.modulation.lin", 3 * H, H)
    linear("final_layer.linear", 64, H)
    linear("final_layer.adaLN_modulation.1", 2 * H, H)
    return s


def t5_xxl_shapes() -> Shapes:
    """T5 v1.1 XXL encoder in the Hugging Face layout ComfyUI's t5xxl loader reads."""
    d, ff, inner = T5["d_model"], T5["d_ff"], T5["inner"]
    s: Shapes = {"shared.weight": (T5["vocab"], d), "encoder.final_layer_norm.weight": (d,),
                 "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, T5["heads"])}
    for i in range(T5["layers"]):
        p = f"encoder.block.{i}.layer"
        for proj in "qkv":
            s[f"{p}.0.SelfAttention.{proj}.weight"] = (inner, d)
        s[f"{p}.0.SelfAttention.o.weight"] = (d, inner)
        s[f"{p}.0.layer_norm.weight"] = (d,)
        s[f"{p}.1.DenseReluDense.wi_0.weight"] = s[f"{p}.1.DenseReluDense.wi_1.weight"] = (ff, d)
        s[f"{p}.1.DenseReluDense.wo.weight"] = (d, ff)
        s[f"{p}.1.layer_norm.weight"] = (d,)
    return s


def module_shapes(build: Any) -> Shapes:
    import torch

    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def clip_l_shapes() -> Shapes:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return module_shapes(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))


def siglip_shapes() -> Shapes:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    shapes = module_shapes(lambda: SiglipVisionModel(SiglipVisionConfig(**SIGLIP_384)))
    # ComfyUI detects SigLIP by "vision_model."-prefixed keys; newer transformers drop the prefix.
    return {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in shapes.items()}


def vae_shapes() -> Shapes:
    from diffusers import AutoencoderKL

    return module_shapes(lambda: AutoencoderKL(**VAE))


def lora_shapes(rank: int = 4) -> Shapes:
    """A LoRA on the first double block's attention, in the diffusers naming ComfyUI accepts."""
    s: Shapes = {}
    for side in ("img", "txt"):
        p = f"diffusion_model.double_blocks.0.{side}_attn"
        s[f"{p}.qkv.lora_A.weight"], s[f"{p}.qkv.lora_B.weight"] = (rank, H), (3 * H, rank)
        s[f"{p}.proj.lora_A.weight"], s[f"{p}.proj.lora_B.weight"] = (rank, H), (H, rank)
    return s


def redux_shapes() -> Shapes:
    return {"redux_up.weight": (3 * 4096, 1152), "redux_up.bias": (3 * 4096,),
            "redux_down.weight": (4096, 3 * 4096), "redux_down.bias": (4096,)}


class RandomBytes:
    """Random tensor bytes, one draw per (shape, dtype, kind), reused for every tensor alike."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cache: dict[tuple[tuple[int, ...], str, str], bytes] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: str) -> bytes:
        import torch

        norm = len(shape) == 1 and ("norm" in key or key.endswith(".scale"))
        kind = "ones" if norm else "bias" if key.endswith(".bias") else "random"
        cache_key = (shape, dtype, kind)
        if cache_key not in self.cache:
            torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn,
                           "fp32": torch.float32}[dtype]
            if kind == "ones":
                t = torch.ones(shape)
            elif kind == "bias":
                t = torch.zeros(shape)
            else:
                g = torch.Generator().manual_seed(self.seed + len(self.cache))
                t = torch.randn(shape, generator=g).mul_(0.02)
            self.cache[cache_key] = t.to(torch_dtype).contiguous().view(torch.uint8).numpy().tobytes()
        return self.cache[cache_key]


def write_safetensors(path: Path, shapes: Shapes, dtype_of: Any, draw: RandomBytes) -> tuple[int, str]:
    """Stream a safetensors file; returns (size, sha256). Written as .part, renamed when complete."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "fluxstack": "random test weights"}}
    offset = 0
    items = []
    for key, shape in shapes.items():
        dtype = dtype_of(key, shape)
        itemsize = 1 if dtype == "fp8" else 4 if dtype == "fp32" else 2
        n = itemsize
        for dim in shape:
            n *= dim
        header[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        items.append((key, shape, dtype))
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    with open(partial, "wb") as fh:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            fh.write(chunk)
            digest.update(chunk)
        for key, shape, dtype in items:
            data = draw.get(key, shape, dtype)
            fh.write(data)
            digest.update(data)
    os.replace(partial, path)
    return path.stat().st_size, digest.hexdigest()


def _fp8_matrices(key: str, shape: tuple[int, ...]) -> str:
    return "fp8" if len(shape) == 2 and key.endswith(".weight") else "bf16"


# dest -> (shapes, dtype chooser); the names are the shipped manifests' file names.
def sample_files() -> dict[str, tuple[Any, Any]]:
    return {
        "diffusion_models/flux1-dev.safetensors": (flux_shapes, lambda k, s: "bf16"),
        "diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors": (flux_shapes, _fp8_matrices),
        "text_encoders/t5xxl_fp8_e4m3fn.safetensors": (t5_xxl_shapes, lambda k, s: "fp8" if len(s) == 2 else "fp16"),
        "text_encoders/clip_l.safetensors": (clip_l_shapes, lambda k, s: "fp16"),
        "vae/ae.safetensors": (vae_shapes, lambda k, s: "fp16"),
        "loras/flux-realism-lora.safetensors": (lora_shapes, lambda k, s: "bf16"),
        "style_models/flux1-redux-dev.safetensors": (redux_shapes, lambda k, s: "bf16"),
        "clip_vision/sigclip_vision_patch14_384.safetensors": (siglip_shapes, lambda k, s: "fp16"),
    }


# The same T5 bytes serve flux-dev's t5xxl_fp16 name (a hard link): ComfyUI reads the dtype from the file.
ALIASES = {"text_encoders/t5xxl_fp16.safetensors": "text_encoders/t5xxl_fp8_e4m3fn.safetensors"}
MANIFESTS = {
    "flux-dev": ["diffusion_models/flux1-dev.safetensors", "text_encoders/t5xxl_fp16.safetensors",
                 "text_encoders/clip_l.safetensors", "vae/ae.safetensors"],
    "flux-kontext-dev-fp8": ["diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors", "vae/ae.safetensors",
                             "text_encoders/t5xxl_fp8_e4m3fn.safetensors", "text_encoders/clip_l.safetensors"],
}
MANIFESTS["flux-realism-lora"] = [*MANIFESTS["flux-dev"], "loras/flux-realism-lora.safetensors"]
MANIFESTS["flux-redux-dev"] = [*MANIFESTS["flux-dev"], "style_models/flux1-redux-dev.safetensors",
                               "clip_vision/sigclip_vision_patch14_384.safetensors"]


def generate(out: Path, seed: int = 0, only: Iterable[str] | None = None) -> Path:
    """Write out/store/<dest> and out/manifests/<name>.yaml; returns the manifests folder."""
    store, manifests = out / "store", out / "manifests"
    wanted = set(only) if only is not None else set(MANIFESTS)
    dests = {d for name in wanted for d in MANIFESTS[name]}
    real = {ALIASES.get(d, d) for d in dests}
    draw = RandomBytes(seed)
    done: dict[str, tuple[int, str]] = {}
    for dest, (shapes, dtype_of) in sample_files().items():
        if dest in real:
            done[dest] = write_safetensors(store / dest, shapes(), dtype_of, draw)
    for alias, target in ALIASES.items():
        if alias in dests:
            (store / alias).unlink(missing_ok=True)
            os.link(store / target, store / alias)
            done[alias] = done[target]
    manifests.mkdir(parents=True, exist_ok=True)
    schema = default_manifests_dir() / "schema.json"
    if schema.is_file():
        (manifests / "schema.json").write_bytes(schema.read_bytes())
    for name in sorted(wanted):
        files = [{"repo": "fluxstack/comfy-sample", "revision": "main", "path": dest, "dest": dest,
                  "size": done[dest][0], "sha256": done[dest][1], "gated": False, "license": "test-only"}
                 for dest in MANIFESTS[name]]
        doc = {"name": name, "description": f"random-weight stand-in for {name} (ComfyUI tests)", "files": files}
        (manifests / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return manifests
