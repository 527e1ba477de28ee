"""GPU benchmark of the runtime's own code path with full-size FLUX.1-shaped random weights.

Writes the files in their real layouts (BFL transformer, diffusers VAE, transformers-keyed
CLIP-L and T5-XXL), loads them with fluxstack.runtime.engine.build_pipeline exactly as the
service does, and measures side by side on one card:
  - plain diffusers bf16 eager (transformer + VAE, prompt embeddings precomputed: the
    ARCHITECTURE 4.4 baseline), on the same pipeline object;
  - the runtime end to end (Engine.generate: text encoding, denoising, VAE, PNG encoding);
  - the fp8 profile (24 GB-card story) and schnell 4 steps;
  - load time (weights in the page cache) and peak GPU memory for each.

    python bench/gpu/runtime_bench.py --work /tmp/fluxbench --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from full_size import (
    CLIP_L,
    DEV_TRANSFORMER,
    T5_XXL,
    VAE,
    bfl_transformer_shapes,
    module_shapes,
    random_state,
    write_configs,
)

from fluxstack.manifest import Manifest
from fluxstack.runtime.engine import Engine, Job, NonFinite, build_pipeline
from fluxstack.runtime.tiny import _clip_tokenizer, _t5_tokenizer
from fluxstack.runtime.variants import BASE_DEFAULTS, Variant

# What the benchmarks ask of FLUX.1-dev: the guide's 28 steps, guidance 3.5 and 512 T5 tokens.
DEV_DEFAULTS = {"steps": 28, "guidance": 3.5, "max_sequence_length": 512}
DEV_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "shift": 3.0, "use_dynamic_shifting": True}
SCHNELL_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                     "shift": 1.0, "use_dynamic_shifting": False}


def save(tensors: dict, path: Path) -> float:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    save_file(tensors, str(path))
    return time.perf_counter() - t


def store_paths(work: Path, schnell: bool) -> dict[str, Path]:
    """Where make_store puts each role's file (the cold-start benchmark reads them without writing)."""
    name = "schnell" if schnell else "dev"
    return {"transformer": work / f"diffusion_models/flux1-{name}.safetensors", "vae": work / "vae/ae.safetensors",
            "clip": work / "text_encoders/clip_l.safetensors", "t5": work / "text_encoders/t5xxl_fp16.safetensors",
            "config": work / f"configs/{name}", "tokenizers": work / "tokenizers/flux"}


def make_store(work: Path, schnell: bool) -> dict[str, Path]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    paths = store_paths(work, schnell)
    write_configs(paths["config"], {**DEV_TRANSFORMER, "guidance_embeds": not schnell},
                  SCHNELL_SCHEDULER if schnell else DEV_SCHEDULER)
    if not paths["tokenizers"].exists():
        _clip_tokenizer(paths["tokenizers"] / "tokenizer")
        _t5_tokenizer(paths["tokenizers"] / "tokenizer_2")
    if not paths["transformer"].exists():
        for old in (work / "diffusion_models").glob("*.safetensors"):
            old.unlink()  # one 24 GB transformer on disk at a time
        save(random_state(bfl_transformer_shapes(guidance=not schnell), "cuda", torch.bfloat16), paths["transformer"])
    if not paths["vae"].exists():
        save({k: v.to(torch.bfloat16) for k, v in AutoencoderKL(**VAE).state_dict().items()}, paths["vae"])
    with torch.device("meta"):
        clip_shapes = module_shapes(CLIPTextModel(CLIPTextConfig(**CLIP_L)))
        t5_shapes = module_shapes(T5EncoderModel(T5Config(**T5_XXL)), skip=("encoder.embed_tokens.weight",))
    if not paths["clip"].exists():
        save(random_state(clip_shapes, "cuda", torch.bfloat16, seed=1), paths["clip"])
    if not paths["t5"].exists():
        save(random_state(t5_shapes, "cuda", torch.bfloat16, seed=2), paths["t5"])
    return paths


def variant(paths: dict[str, Path], name: str, defaults: dict) -> Variant:
    manifest = Manifest(name=name, description="benchmark", path=Path(name), include=[], own_files=[], files=[])
    return Variant(name, "text-to-image", manifest, paths, {**BASE_DEFAULTS, **defaults},
                   {role: "random" for role in ("transformer", "vae", "clip", "t5")})


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def measure(v: Variant, profile: str, steps: int, guidance: float, msl: int, runs: int, baseline: bool) -> dict:
    free()
    t = time.perf_counter()
    pipe = build_pipeline(v, profile, "cuda")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    engine = Engine([v], Path("/nonexistent"), profile)
    engine.profile, engine.device = profile, "cuda"
    engine.pipes[v.name], engine.loaded_loras[v.name] = pipe, set()
    job = Job(variant=v.name, prompt="A cat holding a sign that says hello world", width=1024, height=1024,
              steps=steps, guidance=guidance, seed=0, n=1, max_sequence_length=msl)
    finite = []

    def run() -> None:
        try:
            engine.generate(job)
            finite.append(True)
        except NonFinite:  # random weights may overflow; the time is still the time of the full path
            finite.append(False)

    first = timed(run, 1)[0]
    torch.cuda.reset_peak_memory_stats()
    e2e = timed(run, runs)
    result = {"profile": profile, "steps": steps, "load_s": load_s, "load_peak_gib": load_peak,
              "first_request_s": first,
              "runtime_e2e_s": e2e, "runtime_e2e_median_s": statistics.median(e2e),
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "finite_outputs": all(finite)}
    if baseline:
        with torch.inference_mode():
            pe, ppe, _ = pipe.encode_prompt(job.prompt, prompt_2=None, max_sequence_length=msl)
        gen = lambda: pipe(prompt_embeds=pe, pooled_prompt_embeds=ppe, width=1024, height=1024,  # noqa: E731
                           num_inference_steps=steps, guidance_scale=guidance,
                           generator=torch.Generator("cpu").manual_seed(0))
        with torch.inference_mode():
            torch.cuda.reset_peak_memory_stats()
            plain = timed(gen, runs)
        result |= {"plain_diffusers_no_text_s": plain, "plain_diffusers_no_text_median_s": statistics.median(plain),
                   "plain_s_per_step": statistics.median(plain) / steps,
                   "plain_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps({v.name: result}), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/fluxbench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parts", default="full,fp8,schnell",
                        help="comma list of: full, fp8, schnell, model-offload, sequential-offload")
    args = parser.parse_args()
    import diffusers
    import transformers

    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "weights": "random, full-size FLUX.1 shapes",
                     "image": "1024x1024", "runs": args.runs}
    t = time.perf_counter()
    dev = make_store(args.work, schnell=False)
    results["write_files_s"] = time.perf_counter() - t
    dev_defaults = {"steps": 28, "guidance": 3.5, "max_sequence_length": 512}
    parts = args.parts.split(",")
    runs = {"full": ("dev_full", "full", 28, True), "fp8": ("dev_fp8", "fp8", 28, False),
            "model-offload": ("dev_model_offload", "model-offload", 28, False),
            "sequential-offload": ("dev_sequential_offload", "sequential-offload", 4, False)}
    for part, (key, profile, steps, baseline) in runs.items():
        if part in parts:
            results[key] = measure(variant(dev, "flux-dev", dev_defaults), profile, steps, 3.5, 512, args.runs,
                                   baseline)
            args.out.write_text(json.dumps(results, indent=2))  # after each part: a cut-off run keeps the rest
    if "schnell" in parts:
        schnell = make_store(args.work, schnell=True)
        results["schnell_full"] = measure(variant(schnell, "flux-schnell", {"steps": 4, "guidance": 0.0}), "full",
                                          4, 0.0, 256, args.runs, True)
        args.out.write_text(json.dumps(results, indent=2))
    shutil.rmtree(args.work / "configs", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
