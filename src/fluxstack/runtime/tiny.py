"""A complete, tiny FLUX-architecture model, generated deterministically, for tests and the demo.

Same classes and code paths as FLUX.1 (FluxTransformer2DModel, a 16-channel AutoencoderKL,
CLIP-L and T5 text encoders, their tokenizers, the flow-matching scheduler), with random
weights a few MB in size. Written as single files in the store layout plus the config and
tokenizer folders, with a manifest (sha256-locked, with a runtime section) so it goes
through the real path: manifest -> mirror -> seeder -> store -> runtime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

TINY_REPO = "fluxstack/tiny-flux"
ASCII = [chr(c) for c in range(33, 127)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_safetensors(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes 0600; services read the store as another user


def _clip_tokenizer(folder: Path) -> None:
    """A byte-level BPE vocabulary over printable ASCII, CLIP-style (</w> word ends)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in ASCII:
        vocab[ch] = len(vocab)
    for ch in ASCII:
        vocab[f"{ch}</w>"] = len(vocab)
    merges = ["#version: 0.2"]
    for pair in ("t h", "th e</w>", "a n", "i n", "e r</w>"):
        merges.append(pair)
        vocab[pair.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, sort_keys=True))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))


def _t5_tokenizer(folder: Path) -> None:
    """A unigram tokenizer over single characters, with T5's special tokens and ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(ch, -2.0) for ch in ASCII]
    pieces += [(f"\u2581{ch}", -1.5) for ch in ASCII]
    core = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    core.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    core.save(str(folder / "tokenizer.json"))
    tokenizer = T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>", extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(str(folder))


def generate(out: Path, seed: int = 0, name: str = "tiny-flux") -> Path:
    """Write the tiny model into the store layout under out/store and its manifest to out/<name>.yaml."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    store = out / "store"
    config_dir = store / "configs" / name
    tokenizer_dir = store / "tokenizers" / name
    torch.manual_seed(seed)

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[16, 16, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159)
    clip_config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=256, max_position_embeddings=77, projection_dim=32,
                                 bos_token_id=193, eos_token_id=194, pad_token_id=194)
    clip = CLIPTextModel(clip_config)
    t5_config = T5Config(d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, vocab_size=200,
                         relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    t5 = T5EncoderModel(t5_config)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True)

    files = {
        "diffusion_models/flux1-tiny.safetensors": transformer.state_dict(),
        "vae/ae-tiny.safetensors": vae.state_dict(),
        "text_encoders/clip_l-tiny.safetensors": clip.state_dict(),
        "text_encoders/t5xxl-tiny.safetensors": {k: v for k, v in t5.state_dict().items()
                                                  if k != "encoder.embed_tokens.weight"},  # tied to shared, as in t5xxl
    }
    for dest, tensors in files.items():
        _save_safetensors(tensors, store / dest)
    lora = tiny_lora(transformer, seed)
    _save_safetensors(lora, store / "loras" / "tiny-style.safetensors")

    transformer.save_config(str(config_dir / "transformer"))
    vae.save_config(str(config_dir / "vae"))
    clip_config.save_pretrained(str(config_dir / "text_encoder"))
    t5_config.save_pretrained(str(config_dir / "text_encoder_2"))
    scheduler.save_config(str(config_dir / "scheduler"))
    _clip_tokenizer(tokenizer_dir / "tokenizer")
    _t5_tokenizer(tokenizer_dir / "tokenizer_2")

    entries = []
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        dest = str(path.relative_to(store))
        entries.append({"repo": TINY_REPO, "revision": "main", "path": dest, "dest": dest,
                        "size": path.stat().st_size, "sha256": _sha256(path), "gated": False, "license": "apache-2.0"})
    manifest = {
        "name": name,
        "description": "Tiny FLUX-architecture model with random weights, for tests and the demo (not an image model).",
        "files": entries,
        "runtime": {
            "variant": name, "task": "text-to-image",
            "transformer": "diffusion_models/flux1-tiny.safetensors", "vae": "vae/ae-tiny.safetensors",
            "clip": "text_encoders/clip_l-tiny.safetensors", "t5": "text_encoders/t5xxl-tiny.safetensors",
            "config": f"configs/{name}", "tokenizers": f"tokenizers/{name}",
            "defaults": {"steps": 4, "guidance": 3.5, "width": 64, "height": 64, "max_sequence_length": 64},
        },
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False, width=120))
    # The same files as an image-edit (Kontext) variant: same architecture, different pipeline.
    kontext = {"name": f"{name}-kontext", "description": f"{name} served as an image-edit (Kontext) model.",
               "include": [name], "runtime": {**manifest["runtime"], "variant": f"{name}-kontext",
                                              "task": "image-edit"}}
    (out / f"{name}-kontext.yaml").write_text(yaml.safe_dump(kontext, sort_keys=False, width=120))
    return path


def tiny_lora(transformer: Any, seed: int, rank: int = 4) -> dict[str, Any]:
    """A LoRA for the tiny transformer in the diffusers/peft layout that `load_lora_weights` reads."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name, module in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v")):
            out_features, in_features = module.weight.shape
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.5
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.5
    return tensors
