"""Prepared weights: the transformer as the fp8 modes compute with it, saved once, loaded directly after.

A cold start in the fp8 modes reads the store's bf16 file (24 GB for FLUX.1-dev), converts Black Forest
Labs' key layout to diffusers', moves it to the GPU, fuses the QKV projections and quantizes every
linear layer of the blocks. The result is half the bytes and needs none of that work again, so the
first start writes it beside the compile cache (the same volume) and later starts load it straight
onto the GPU. The file is keyed by the transformer's sha256 (the manifest's, verified by the seeder)
and by what shapes its contents (this layout's FORMAT, torch and diffusers versions); it is written
under a temporary name of its own and renamed, so an interrupted write never looks complete and two
runtimes sharing the cache volume never write into one file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import secrets
import struct
import time
from pathlib import Path
from typing import Any

from fluxstack.runtime import weights_read

# Bump when fuse_qkv's or Fp8Linear's parameters change: older files then stop matching.
FORMAT = "fluxstack-fp8-rowwise-fused-qkv-1"
STALE_PART_SECONDS = 3600


def prepared_path(directory: Path, transformer_sha256: str) -> Path:
    """Where the prepared transformer for this file and this software lives."""
    import torch

    # diffusers' version from its metadata: the runtime asks before importing diffusers (seconds).
    diffusers = importlib.metadata.version("diffusers")
    ident = f"{transformer_sha256}|{FORMAT}|torch {torch.__version__}|diffusers {diffusers}"
    return directory / f"{transformer_sha256[:16]}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.safetensors"


def _safetensors_dtype(dtype: Any) -> str:
    """safetensors' name for a torch dtype: the reader's table (weights_read.DTYPES), read backwards."""
    names = {torch_name: name for name, torch_name in weights_read.DTYPES.items()}
    if str(dtype).removeprefix("torch.") not in names:
        raise ValueError(f"prepared weights cannot store {dtype}")
    return names[str(dtype).removeprefix("torch.")]


def save(module: Any, path: Path) -> int:
    """Write `module`'s state in the safetensors format, one tensor at a time (GPU tensors are copied to
    the CPU one by one, not as a 12 GB whole); returns the bytes written."""
    import torch

    state = {name: t.detach() for name, t in module.state_dict().items()}
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT}}
    offset = 0
    for name, t in state.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _safetensors_dtype(t.dtype), "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{secrets.token_hex(4)}.part")
    # Partial files of writers that died (killed, disk full) hold gigabytes; a live writer's is recent.
    for old in path.parent.glob(f"{path.name}.*.part"):
        with contextlib.suppress(FileNotFoundError):  # another runtime may finish or remove it meanwhile
            if time.time() - old.stat().st_mtime > STALE_PART_SECONDS:
                old.unlink()
    try:
        with open(part, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for t in state.values():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    # Files for the same transformer made by other software versions will never match again.
    for stale in path.parent.glob(f"{path.name.split('-')[0]}-*.safetensors"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return 8 + len(head) + offset


def load(config_dir: Path, state: dict[str, Any]) -> Any:
    """The transformer from a prepared file's tensors: built empty (on the meta device, no memory), given
    the fp8 modes' structure, then the tensors (with their dtypes and device) become its parameters."""
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxstack.runtime.fp8 import quantize_linears
    from fluxstack.runtime.perf import fuse_qkv

    config = FluxTransformer2DModel.load_config(str(config_dir), subfolder="transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
        for blocks in (model.transformer_blocks, model.single_transformer_blocks):
            for block in blocks:
                fuse_qkv(block)
                quantize_linears(block)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
