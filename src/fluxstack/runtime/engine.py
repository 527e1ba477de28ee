"""Pipelines built from the store's single files, and the one place images are generated.

Loading is offline by construction: every config and tokenizer comes from the store
(the same files ComfyUI reads, plus small config folders), so HF_HUB_OFFLINE=1 holds.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxstack import __version__
from fluxstack.errors import UsageError
from fluxstack.runtime import png, prepared, weights_read
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
    """A transformers encoder from a single ComfyUI-style file (transformers key names), by transformers'
    loader: CLIP, whose position ids are not in the file."""
    config = cls.config_class.from_pretrained(str(config_dir))
    model, info = cls.from_pretrained(None, config=config, state_dict=_state_dict(weights, "cpu", None, None),
                                      dtype=dtype, output_loading_info=True,
                                      **({"device_map": device} if device != "cpu" else {}))
    _refuse_missing(weights, info["missing_keys"])
    return model.eval()


def _assign_text_encoder(cls: Any, config_dir: Path, weights: Path, state: dict[str, Any]) -> Any:
    """A transformers encoder built empty (meta device) whose parameters become `state`'s tensors, on their
    device and in their dtype: T5-XXL, every tensor of which is in its file. transformers' loader would
    first reserve the model's size again on the GPU (its allocator warm-up): 9 GiB more than the model."""
    import torch

    config = cls.config_class.from_pretrained(str(config_dir))
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # T5's input embedding is its shared embedding, stored once
    _refuse_missing(weights, [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta])
    return model.eval()


def _refuse_missing(weights: Path, missing: list[str]) -> None:
    if missing:
        raise UsageError(f"{weights} lacks {len(missing)} weights the model needs (first: {sorted(missing)[0]}); "
                         "the file is not the text encoder the manifest says it is")


def _state_dict(path: Path, device: str, dtype: str | None, prefetch: weights_read.Prefetch | None) -> dict[str, Any]:
    """A file's tensors on `device` (floats in `dtype`): the prefetch's when it read them, else read now."""
    if prefetch is not None and path in prefetch:
        return prefetch.take(path)
    return weights_read.read(path, device, dtype, threads=1)


def prefetch_jobs(variant: Variant, profile: str, device: str, perf: str,
                  prepared_dir: Path | None) -> list[tuple[Path, str, str | None]]:
    """The big files build_pipeline will read, with the device and dtype each becomes: the prepared
    transformer (when there is one) and T5-XXL (stored in fp16, computed in bf16), about 20 GB for FLUX.1-dev."""
    jobs: list[tuple[Path, str, str | None]] = []
    prepared_file = _prepared_file(variant, perf, prepared_dir)
    if prepared_file is not None and prepared_file.exists():
        jobs.append((prepared_file, "cuda", None))
    jobs.append((variant.paths["t5"], _encoder_device(profile), _compute_dtype(device)))
    return jobs


def _compute_dtype(device: str) -> str:
    return "float32" if device == "cpu" else "bfloat16"


def _encoder_device(profile: str) -> str:
    """Where build_pipeline loads the text encoders: only `full` loads straight onto the GPU (4-5x faster
    than .to("cuda")); the other profiles load in CPU memory and place them afterwards."""
    return "cuda" if profile == "full" else "cpu"


def _prepared_file(variant: Variant, perf: str, prepared_dir: Path | None) -> Path | None:
    if prepared_dir is None or perf not in ("fp8", "fast") or not variant.sha256.get("transformer"):
        return None
    return prepared.prepared_path(prepared_dir, variant.sha256["transformer"])


def _report_compute_dtype(model: Any, dtype: Any) -> None:
    """The pipeline casts prompt embeddings to text_encoder_2.dtype, which for a model stored in fp8
    would be fp8; make the model report the dtype it computes in."""
    cls = type(model)
    model.__class__ = type(f"{cls.__name__}ComputeIn{dtype}".replace("torch.", ""), (cls,),
                           {"dtype": property(lambda self: dtype)})


def build_pipeline(variant: Variant, profile: str, device: str, perf: str = "exact",
                   prepared_dir: Path | None = None, prefetch: weights_read.Prefetch | None = None) -> Any:
    """The pipeline for one variant; `perf` is a mode already checked by perf.choose_perf.

    `prepared_dir`: where the fp8 modes keep the prepared transformer (runtime/prepared.py); None
    loads from the store's file every time. `prefetch`: reading prefetch_jobs() in the background
    (started before this function imports diffusers and transformers, which takes seconds)."""
    import torch

    imports_started = time.monotonic()
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    os.environ["HF_HUB_OFFLINE"] = "1"
    dtype = getattr(torch, _compute_dtype(device))
    p = variant.paths
    config = str(p["config"])
    # Only `full` loads straight onto the GPU; fp8 loads in CPU memory and casts there, so a 24 GB card
    # never holds the 22 GiB bf16 transformer.
    on_gpu = profile == "full"
    # Where loading went, for /readyz and the cold-start benchmark; the first start in a process
    # imports diffusers and transformers (seconds), later ones find them imported.
    laps: dict[str, float] = {"imports": round(time.monotonic() - imports_started, 2)}
    started = [time.monotonic()]

    def lap(name: str) -> None:
        now = time.monotonic()
        laps[name] = round(now - started[0], 2)
        started[0] = now

    prepared_file = _prepared_file(variant, perf, prepared_dir)
    transformer, prepared_note = _load_prepared(prepared_file, p["config"], "cuda", prefetch)
    from_prepared = transformer is not None
    if not from_prepared:
        transformer = FluxTransformer2DModel.from_single_file(
            str(p["transformer"]), config=config, subfolder="transformer", torch_dtype=dtype, local_files_only=True,
            **({"device_map": "cuda"} if on_gpu else {}))
    lap("transformer")
    vae = AutoencoderKL.from_single_file(str(p["vae"]), config=config, subfolder="vae", torch_dtype=dtype,
                                         local_files_only=True)
    encoder_device = _encoder_device(profile)
    clip = _load_text_encoder(CLIPTextModel, p["config"] / "text_encoder", p["clip"], dtype, encoder_device)
    lap("vae_clip")
    t5 = _assign_text_encoder(T5EncoderModel, p["config"] / "text_encoder_2", p["t5"],
                              _state_dict(p["t5"], encoder_device, _compute_dtype(device), prefetch))
    lap("t5")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(config, subfolder="scheduler")
    cls = FluxKontextPipeline if variant.task == "image-edit" else FluxPipeline
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=clip, text_encoder_2=t5, transformer=transformer,
               tokenizer=CLIPTokenizer.from_pretrained(str(p["tokenizers"] / "tokenizer")),
               tokenizer_2=T5TokenizerFast.from_pretrained(str(p["tokenizers"] / "tokenizer_2")))
    if profile == "fp8":
        # Weights stored as fp8, computed in bf16: FLUX.1-dev fits a 24 GB card. The fp8/fast
        # performance modes store the transformer in fp8 themselves (and compute in fp8).
        from diffusers.hooks import apply_layerwise_casting

        if perf in ("exact", "bf16"):
            transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        # T5's feed-forward casts its input to wo's stored dtype before wo runs, so wo stays bf16.
        apply_layerwise_casting(t5, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype,
                                skip_modules_pattern=("layer_norm", "shared", "relative_attention_bias", r"\.wo$"))
        _report_compute_dtype(t5, dtype)
    if perf != "exact":
        from fluxstack.runtime import perf as perf_modes

        pipe.perf_info = perf_modes.apply(pipe, perf, profile, prepared=from_prepared)
        if prepared_file is not None and not from_prepared:
            prepared_note = _save_prepared(transformer, prepared_file, prepared_note)
        pipe.perf_info["prepared_weights"] = prepared_note
    lap("assemble_and_perf")
    if profile in ("full", "fp8"):
        pipe.to("cuda")
    elif profile == "model-offload":
        pipe.enable_model_cpu_offload()
    elif profile == "sequential-offload":
        pipe.enable_sequential_cpu_offload()
    pipe.set_progress_bar_config(disable=True)
    lap("placement")
    pipe.load_parts_s = laps
    if prefetch is not None:
        pipe.read_ahead = prefetch.done
    return pipe


def _load_prepared(path: Path | None, config_dir: Path, device: str,
                   prefetch: weights_read.Prefetch | None = None) -> tuple[Any, str]:
    """(transformer or None, what happened). A prepared file that cannot be loaded is removed, and the
    store's file is loaded instead: the prepared file is only ever a faster copy of it."""
    if path is None:
        return None, "off"
    if not path.exists():
        return None, f"none yet at {path}"
    import torch

    t = time.monotonic()
    try:
        transformer = prepared.load(config_dir, _state_dict(path, device, None, prefetch))
    except torch.OutOfMemoryError as exc:
        # The file is fine (kept); the GPU is too full for this model whichever file it comes from.
        raise UsageError(f"the GPU has too little free memory for the prepared transformer {path} "
                         f"({path.stat().st_size / GiB:.1f} GiB; the file is kept): free GPU memory (nvidia-smi "
                         "shows which process holds it), or raise --gpu-memory-limit if you set one "
                         f"({str(exc).splitlines()[0][:200]})") from exc
    except Exception as exc:  # noqa: BLE001 - any damage to a cache file means: rebuild it from the store
        path.unlink(missing_ok=True)
        return None, f"unusable, removed ({type(exc).__name__}: {str(exc)[:200]}); rebuilding {path}"
    return transformer, f"loaded {path} in {time.monotonic() - t:.1f} s"


def _save_prepared(transformer: Any, path: Path, note: str) -> str:
    t = time.monotonic()
    try:
        size = prepared.save(transformer, path)
    except OSError as exc:
        # A full or read-only cache volume costs the next start its speed-up, never this one its model.
        return f"{note}; not written ({exc}): the next start converts the store's file again"
    return f"{note}; wrote {size / GiB:.1f} GiB in {time.monotonic() - t:.1f} s"


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
                 gpu_memory_limit: int | None = None, perf: str = "exact", compile_cache: Path | None = None,
                 warm_up: bool = True, prepared_weights: bool = True,
                 read_threads: int = weights_read.THREADS) -> None:
        self.variants = {v.name: v for v in variants}
        self.gpu_memory_limit = gpu_memory_limit  # bytes; lets the runtime share a GPU (with ComfyUI, say)
        self.loras_dir = loras_dir
        self.requested_profile = profile
        self.requested_perf = perf
        self.compile_cache = compile_cache
        self.prepared_weights = prepared_weights  # keep the fp8 modes' transformer beside the compile cache
        self.read_threads = read_threads  # 0: no background reading, each file read when it is needed
        self.warm_up = warm_up  # compiled modes compile on their first call; do it before /readyz says ready
        self.perf = ""
        self.perf_why = ""
        self.timings: dict[str, float] = {}  # load and warm-up seconds, for logs and the benchmark
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
            from fluxstack.runtime import perf

            self.perf, self.perf_why = perf.choose_perf(self.requested_perf, self.profile, self.device)
            prepared_dir = None
            if self.perf != "exact":
                cache = perf.compile_cache_dir(self.compile_cache)
                perf.use_compile_cache(cache)
                prepared_dir = cache / "prepared" if self.prepared_weights else None
            for name, variant in self.variants.items():
                t = time.monotonic()
                prefetch = None
                if self.read_threads:
                    jobs = prefetch_jobs(variant, self.profile, self.device, self.perf, prepared_dir)
                    prefetch = weights_read.Prefetch(jobs, self.read_threads)
                self.pipes[name] = build_pipeline(variant, self.profile, self.device, self.perf, prepared_dir,
                                                  prefetch)
                self.loaded_loras[name] = set()
                self.timings[f"{name}_load_s"] = time.monotonic() - t
                if self.perf != "exact" and self.warm_up:
                    t = time.monotonic()
                    self._warm_up(variant)
                    self.timings[f"{name}_warm_up_s"] = time.monotonic() - t
            self.ready.set()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            raise

    def startup(self) -> dict[str, Any]:
        """Where the start went, per variant: load and warm-up seconds, and the prepared weights' fate."""
        # list(): load() adds entries from its own thread while /readyz reads them
        out: dict[str, Any] = {k: round(v, 1) for k, v in list(self.timings.items())}
        for name, pipe in list(self.pipes.items()):
            out[f"{name}_load_parts_s"] = getattr(pipe, "load_parts_s", {})
            if getattr(pipe, "read_ahead", None):
                out[f"{name}_read_ahead"] = pipe.read_ahead
            note = getattr(pipe, "perf_info", {}).get("prepared_weights")
            if note:
                out[f"{name}_prepared_weights"] = note
        return out

    def _warm_up(self, variant: Variant) -> None:
        """One step at the variant's default size: compiles (or loads from the compile cache) the
        graphs every default request uses, so the first real request runs at full speed. Image-edit
        models get an input image: their transformer sees the image's tokens too, another shape."""
        from PIL import Image

        d = variant.defaults
        size = (d["width"], d["height"])
        image = Image.new("RGB", size, (128, 128, 128)) if variant.task == "image-edit" else None
        with contextlib.suppress(NonFinite):  # random or broken weights: the graphs are compiled all the same
            self.generate(Job(variant=variant.name, prompt="warm-up", width=size[0], height=size[1], steps=1,
                              guidance=d["guidance"], seed=0, n=1, max_sequence_length=d["max_sequence_length"],
                              image=image), encode=False)

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

    def generate(self, job: Job, encode: bool = True) -> list[bytes]:
        import torch

        variant = self.variants[job.variant]
        pipe = self.pipes[job.variant]
        if job.loras and self.perf not in ("", "exact"):
            raise UsageError(f"LoRAs need --perf exact: the {self.perf} mode fuses and compiles the transformer")
        self._apply_loras(job.variant, pipe, job.loras)
        step_cache = getattr(pipe, "perf_info", {}).get("step_cache")
        if step_cache is not None:
            step_cache.start(job.steps)
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
        # The speed modes finish on the GPU: NaN check and uint8 conversion there move 3 MB to the CPU
        # instead of 12 MB of float32 and skip two numpy passes (about 0.05 s of a 2 s image). exact keeps
        # the plain pipeline's path, so its bytes stay what they were.
        on_gpu = self.perf not in ("", "exact")
        out_of_memory = False
        try:
            with torch.inference_mode():
                pixels = pipe(output_type="pt" if on_gpu else "np", **kwargs).images
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

        if on_gpu:
            finite = bool(torch.isfinite(pixels).all())
            pixels = (pixels.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        else:
            finite = bool(np.isfinite(pixels).all())
        if not finite:
            # A black or noisy PNG would hide it; say so instead.
            raise NonFinite(f"{variant.name} produced non-finite pixels (NaN/inf) for this request: the weights or "
                            f"the {self.profile} profile's dtype are numerically broken for it; check the model files "
                            "(`fluxstack seed --verify --full`) or try another --profile")
        if not encode:
            return []
        images = list(pixels) if on_gpu else pipe.numpy_to_pil(pixels)
        return [self._png(image, job, variant, index) for index, image in enumerate(images)]

    def _png(self, image: Any, job: Job, variant: Variant, index: int) -> bytes:
        """`image`: a PIL image in exact mode (PIL's encoder, whose bytes exact keeps), else a uint8 array."""
        files = {role: sha for role, sha in variant.sha256.items()}
        for lora, _ in job.loras:
            files[f"lora:{lora}"] = lora_sha256(self.available_loras()[lora])
        meta = {"prompt": job.prompt, "seed": job.seed, "index": index, "steps": job.steps,
                "guidance": job.guidance, "width": job.width, "height": job.height, "model": variant.name,
                "manifest": variant.manifest.name, "manifest_digest": variant.manifest.digest(),
                "loras": [{"name": n, "weight": w} for n, w in job.loras], "sha256": files,
                "fluxstack": __version__}
        fast = self.perf not in ("", "exact")
        if fast:
            meta["perf"] = self.perf  # the same seed gives other pixels in another mode: say which made these
        text = {"fluxstack": json.dumps(meta, sort_keys=True), "Description": job.prompt}
        if fast:
            return png.encode(image, text)
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
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
