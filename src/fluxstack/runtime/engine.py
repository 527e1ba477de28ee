"""Pipelines built from the store's single files, and the one place images are generated.

Loading is offline by construction: every config and tokenizer comes from the store
(the same files ComfyUI reads, plus small config folders), so HF_HUB_OFFLINE=1 holds.
"""

from __future__ import annotations

import gc
import io
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxstack import __version__
from fluxstack.errors import UsageError
from fluxstack.runtime.variants import Variant

PROFILES = ("auto", "full", "fp8", "model-offload", "sequential-offload", "cpu")
GiB = 1 << 30


class NonFinite(Exception):
    """The pipeline produced NaN/inf pixels (a numerically broken model or dtype), not an image."""


class OutOfMemory(Exception):
    """The GPU ran out of memory for this request; memory was freed, the next request can run."""


def choose_profile(requested: str, memory_limit: int | None = None) -> tuple[str, str]:
    """(profile, device) for the request 'auto' or a named profile, from the detected GPU (or its cap)."""
    import torch

    if requested not in PROFILES:
        raise UsageError(f"unknown memory profile {requested!r}; choose one of {', '.join(PROFILES)}")
    if not torch.cuda.is_available():
        if requested not in ("auto", "cpu"):
            raise UsageError(f"profile {requested!r} needs a CUDA GPU and none is visible; use --profile cpu")
        return "cpu", "cpu"
    if requested != "auto":
        return requested, "cpu" if requested == "cpu" else "cuda"
    # Measured peaks for FLUX.1-dev at 1024x1024 on an H100 (docs/benchmarks.md): full 33.8 GiB,
    # fp8 22.3 GiB, model-offload 22.7 GiB (the bf16 transformer alone) and 5.6x slower than fp8,
    # so model-offload is never the automatic choice; below fp8's needs only sequential offload fits.
    total = torch.cuda.get_device_properties(0).total_memory
    total = min(total, memory_limit) if memory_limit else total
    if total >= 36 * GiB:
        return "full", "cuda"
    if total >= 23 * GiB:
        return "fp8", "cuda"
    return "sequential-offload", "cuda"


def _load_text_encoder(cls: Any, config_dir: Path, weights: Path, dtype: Any, device: str) -> Any:
    """A transformers encoder from a single ComfyUI-style file (transformers key names)."""
    from safetensors.torch import load_file

    config = cls.config_class.from_pretrained(str(config_dir))
    model, info = cls.from_pretrained(None, config=config, state_dict=load_file(str(weights)), dtype=dtype,
                                      output_loading_info=True, **({"device_map": device} if device != "cpu" else {}))
    missing = info["missing_keys"]
    if missing:
        raise UsageError(f"{weights} lacks {len(missing)} weights the model needs (first: {sorted(missing)[0]}); "
                         "the file is not the text encoder the manifest says it is")
    return model.eval()


def _report_compute_dtype(model: Any, dtype: Any) -> None:
    """The pipeline casts prompt embeddings to text_encoder_2.dtype, which for a model stored in fp8
    would be fp8; make the model report the dtype it computes in."""
    cls = type(model)
    model.__class__ = type(f"{cls.__name__}ComputeIn{dtype}".replace("torch.", ""), (cls,),
                           {"dtype": property(lambda self: dtype)})


def build_pipeline(variant: Variant, profile: str, device: str) -> Any:
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    os.environ["HF_HUB_OFFLINE"] = "1"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = variant.paths
    config = str(p["config"])
    # Only `full` loads straight onto the GPU (4-5x faster than .to("cuda")); fp8 loads in CPU memory
    # and casts there, so a 24 GB card never holds the 22 GiB bf16 transformer.
    on_gpu = profile == "full"
    transformer = FluxTransformer2DModel.from_single_file(
        str(p["transformer"]), config=config, subfolder="transformer", torch_dtype=dtype, local_files_only=True,
        **({"device_map": "cuda"} if on_gpu else {}))
    vae = AutoencoderKL.from_single_file(str(p["vae"]), config=config, subfolder="vae", torch_dtype=dtype,
                                         local_files_only=True)
    encoder_device = "cuda" if on_gpu else "cpu"
    clip = _load_text_encoder(CLIPTextModel, p["config"] / "text_encoder", p["clip"], dtype, encoder_device)
    t5 = _load_text_encoder(T5EncoderModel, p["config"] / "text_encoder_2", p["t5"], dtype, encoder_device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(config, subfolder="scheduler")
    cls = FluxKontextPipeline if variant.task == "image-edit" else FluxPipeline
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=clip, text_encoder_2=t5, transformer=transformer,
               tokenizer=CLIPTokenizer.from_pretrained(str(p["tokenizers"] / "tokenizer")),
               tokenizer_2=T5TokenizerFast.from_pretrained(str(p["tokenizers"] / "tokenizer_2")))
    if profile == "fp8":
        # Weights stored as fp8, computed in bf16: FLUX.1-dev fits a 24 GB card.
        from diffusers.hooks import apply_layerwise_casting

        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        # T5's feed-forward casts its input to wo's stored dtype before wo runs, so wo stays bf16.
        apply_layerwise_casting(t5, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype,
                                skip_modules_pattern=("layer_norm", "shared", "relative_attention_bias", r"\.wo$"))
        _report_compute_dtype(t5, dtype)
    if profile in ("full", "fp8"):
        pipe.to("cuda")
    elif profile == "model-offload":
        pipe.enable_model_cpu_offload()
    elif profile == "sequential-offload":
        pipe.enable_sequential_cpu_offload()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Job:
    variant: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    n: int
    max_sequence_length: int
    loras: list[tuple[str, float]] = field(default_factory=list)
    image: Any = None  # PIL image for image-edit variants


class Engine:
    """Owns the pipelines; generate() is called from one worker thread only."""

    def __init__(self, variants: list[Variant], loras_dir: Path, profile: str = "auto",
                 gpu_memory_limit: int | None = None) -> None:
        self.variants = {v.name: v for v in variants}
        self.gpu_memory_limit = gpu_memory_limit  # bytes; lets the runtime share a GPU (with ComfyUI, say)
        self.loras_dir = loras_dir
        self.requested_profile = profile
        self.profile = ""
        self.device = ""
        self.pipes: dict[str, Any] = {}
        self.loaded_loras: dict[str, set[str]] = {}
        self.ready = threading.Event()
        self.load_error: str | None = None

    def load(self) -> None:
        try:
            self.profile, self.device = choose_profile(self.requested_profile, self.gpu_memory_limit)
            if self.device == "cuda" and self.gpu_memory_limit:
                import torch

                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, self.gpu_memory_limit / total))
            for name, variant in self.variants.items():
                self.pipes[name] = build_pipeline(variant, self.profile, self.device)
                self.loaded_loras[name] = set()
            self.ready.set()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            raise

    def available_loras(self) -> dict[str, Path]:
        if not self.loras_dir.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.loras_dir.glob("*.safetensors"))}

    def _apply_loras(self, name: str, pipe: Any, loras: list[tuple[str, float]]) -> None:
        loaded = self.loaded_loras[name]
        files = self.available_loras()
        for lora, _ in loras:
            if lora not in loaded:
                pipe.load_lora_weights(str(files[lora]), adapter_name=lora)
                loaded.add(lora)
        if loras:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in loras], adapter_weights=[w for _, w in loras])
        elif loaded:
            pipe.disable_lora()

    def generate(self, job: Job) -> list[bytes]:
        import torch

        variant = self.variants[job.variant]
        pipe = self.pipes[job.variant]
        self._apply_loras(job.variant, pipe, job.loras)
        kwargs: dict[str, Any] = {
            "prompt": job.prompt, "width": job.width, "height": job.height, "num_inference_steps": job.steps,
            "guidance_scale": job.guidance, "num_images_per_prompt": job.n,
            "max_sequence_length": job.max_sequence_length,
            # CPU noise, as the guide's example: the same seed gives the same image on any device.
            "generator": torch.Generator("cpu").manual_seed(job.seed),
        }
        if variant.task == "image-edit":
            # The input is resized to the output size here, so the pipeline's own resizing (to one of
            # Kontext's trained resolutions) stays off and the caller gets the size it asked for.
            kwargs |= {"image": job.image.resize((job.width, job.height)), "_auto_resize": False,
                       "max_area": job.width * job.height}
        out_of_memory = False
        try:
            with torch.inference_mode():
                pixels = pipe(output_type="np", **kwargs).images
        except torch.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:
            # Outside the except block: the caught exception's traceback holds the activations alive.
            gc.collect()
            torch.cuda.empty_cache()
            raise OutOfMemory(f"the GPU ran out of memory for {job.n} image(s) of {job.width}x{job.height}; "
                              "memory was freed: retry with fewer or smaller images, or a lower memory "
                              "profile (--profile fp8 / model-offload)")
        import numpy as np

        if not np.isfinite(pixels).all():
            # A black or noisy PNG would hide it; say so instead.
            raise NonFinite(f"{variant.name} produced non-finite pixels (NaN/inf) for this request: the weights or "
                            f"the {self.profile} profile's dtype are numerically broken for it; check the model files "
                            "(`fluxstack seed --verify --full`) or try another --profile")
        images = pipe.numpy_to_pil(pixels)
        return [self._png(image, job, variant, index) for index, image in enumerate(images)]

    def _png(self, image: Any, job: Job, variant: Variant, index: int) -> bytes:
        from PIL.PngImagePlugin import PngInfo

        files = {role: sha for role, sha in variant.sha256.items()}
        for lora, _ in job.loras:
            files[f"lora:{lora}"] = lora_sha256(self.available_loras()[lora])
        meta = {"prompt": job.prompt, "seed": job.seed, "index": index, "steps": job.steps,
                "guidance": job.guidance, "width": job.width, "height": job.height, "model": variant.name,
                "manifest": variant.manifest.name, "manifest_digest": variant.manifest.digest(),
                "loras": [{"name": n, "weight": w} for n, w in job.loras], "sha256": files,
                "fluxstack": __version__}
        info = PngInfo()
        info.add_text("fluxstack", json.dumps(meta, sort_keys=True))
        info.add_text("Description", job.prompt)
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()


_LORA_SHA: dict[tuple[str, int, int], str] = {}


def lora_sha256(path: Path) -> str:
    """LoRAs are user files, not manifest entries: hash once per (path, size, mtime)."""
    from fluxstack.hashing import sha256_file

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _LORA_SHA:
        _LORA_SHA[key] = sha256_file(path)
    return _LORA_SHA[key]


def random_seed() -> int:
    return secrets.randbelow(2**31)
