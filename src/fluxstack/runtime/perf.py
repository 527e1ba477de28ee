"""Performance modes: how the transformer computes, chosen by name (`--perf`, `FLUXSTACK_PERF`).

The memory profile (engine.PROFILES) says where the weights live; the performance mode says how
the transformer computes once they are there. docs/performance.md has the measured speed,
memory and error of each mode; bench/gpu/perf_bench.py measures them.

  exact  plain diffusers eager: the reference, and the only mode LoRAs and offload work with.
  bf16   the same bf16 arithmetic, faster: fused QKV projections, cuDNN attention and regional
         torch.compile of the repeated blocks. Differs from exact by bf16 rounding order only.
  fp8    bf16 plus the blocks' linear layers in float8 e4m3 on the fp8 tensor cores (weights
         scaled per output row once, activations per token on every call). Needs compute
         capability 8.9+ (Ada, Hopper, Blackwell).
  fast   fp8 plus a step cache: on a fixed schedule of middle steps the transformer is not run and
         its previous output is reused. 28 FLUX.1-dev steps run the transformer 18 times.
  auto   the fastest of these whose error stayed inside its bound in the benchmark's quality
         guard and that this hardware and memory profile can run.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fluxstack.errors import UsageError

PERF_MODES = ("auto", "exact", "bf16", "fp8", "fast")
# auto's preference, fastest first. Only modes whose quality guard held on the H100 benchmark
# (bench/results/perf-h100-*.json, docs/performance.md) are listed.
AUTO_ORDER = ("fp8", "bf16", "exact")
ON_GPU_PROFILES = ("full", "fp8")  # the profiles that keep the whole transformer on the GPU
PREPARE_SECONDS: dict[str, float] = {}  # where prepare_blocks spent its time, for the benchmark


def fp8_unsupported_reason() -> str | None:
    """Why fp8 matrix multiplication cannot run here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 9):
        return (f"{torch.cuda.get_device_name(0)} has compute capability {major}.{minor}; fp8 tensor cores need "
                "8.9 or newer (L4/L40/RTX 40xx, H100/H200, B200)")
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    return None


def compiler_missing_reason() -> str | None:
    """Why torch.compile cannot build GPU kernels here, or None when it can. The first time Triton
    runs it builds its kernel launcher with a C compiler ($CC, else gcc or clang) against Python's
    headers; without them the compiled modes would fail in the warm-up with a long traceback."""
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return ("torch.compile's GPU backend (Triton) builds its kernel launcher with a C compiler and found "
                "none (gcc, clang or $CC): install gcc (the fluxstack images have it), or use --perf exact")
    # Triton reads the headers from the default install scheme, with Debian's posix_local as posix_prefix.
    scheme = sysconfig.get_default_scheme()
    include = Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])
    if not (include / "Python.h").is_file():
        return (f"torch.compile's GPU backend (Triton) builds its kernel launcher against Python's headers and "
                f"{include / 'Python.h'} is missing: install them (Debian/Ubuntu: python3-dev), or use --perf exact")
    return None


def choose_perf(requested: str, profile: str, device: str) -> tuple[str, str]:
    """(mode, why) for a requested mode on this hardware and memory profile.

    An explicitly named mode that cannot run is refused (UsageError, exit 2) with the reason;
    auto falls back to the next mode down and says why in the second element."""
    if requested not in PERF_MODES:
        raise UsageError(f"unknown performance mode {requested!r}; choose one of {', '.join(PERF_MODES)}")
    blocked: dict[str, str] = {}
    if device != "cuda":
        for mode in ("bf16", "fp8", "fast"):
            blocked[mode] = "it needs a CUDA GPU (this runtime runs on the CPU)"
    elif profile not in ON_GPU_PROFILES:
        for mode in ("bf16", "fp8", "fast"):
            blocked[mode] = (f"it keeps the transformer on the GPU and compiles it, while the {profile} profile "
                             "moves weights between CPU and GPU on every call; use --profile full or fp8")
    else:
        reason = fp8_unsupported_reason()
        if reason:
            blocked["fp8"] = blocked["fast"] = reason
        if profile == "fp8":
            # The fp8 memory profile exists so that no bf16 copy of the transformer is on the GPU.
            blocked["bf16"] = ("it computes from bf16 transformer weights on the GPU, which the fp8 memory profile "
                               "avoids; use --perf fp8 there (fp8 weights, faster) or --perf exact")
        missing = compiler_missing_reason()
        if missing:
            for mode in ("bf16", "fp8", "fast"):
                blocked.setdefault(mode, missing)
    if requested != "auto":
        if requested in blocked:
            raise UsageError(f"performance mode {requested!r} cannot run here: {blocked[requested]}")
        return requested, "requested"
    for mode in AUTO_ORDER:
        if mode not in blocked:
            skipped = [f"{m}: {blocked[m]}" for m in AUTO_ORDER[:AUTO_ORDER.index(mode)] if m in blocked]
            return mode, "auto" + (f" (not {'; not '.join(skipped)})" if skipped else "")
    raise AssertionError("exact is never blocked")


# -- step cache ------------------------------------------------------------------------------
def computed_steps(steps: int) -> list[bool]:
    """Which of `steps` denoising steps run the transformer in the fast mode.

    The first 4 steps set the image's layout and the last 4 its detail, and the velocity changes
    fastest there, so they always run; in between every other step reuses the previous output.
    Fewer than 12 steps (schnell's 4) run every step: each one moves the image too far to skip."""
    if steps < 12:
        return [True] * steps
    return [i < 4 or i >= steps - 4 or (i - 4) % 2 == 1 for i in range(steps)]


class StepCache:
    """Wraps the transformer's forward: on skipped steps the previous computed output is returned.

    Plain reuse, not extrapolation: extrapolating linearly from the last two computed outputs made
    both the per-step and the final-latent error larger on the benchmark (docs/performance.md).
    The engine calls start(steps) before every pipeline call; one transformer call is one step
    (FLUX pipelines without true CFG call it once per step)."""

    def __init__(self, transformer: Any) -> None:
        self.forward = transformer.forward
        self.plan: list[bool] = []
        self.step = 0
        self.last: Any = None
        self.skipped = 0
        transformer.forward = self  # nn.Module.__call__ runs hooks around self.forward: they still see each step

    def start(self, steps: int) -> None:
        self.plan, self.step, self.last, self.skipped = computed_steps(steps), 0, None, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        step, self.step = self.step, self.step + 1
        if self.last is not None and step < len(self.plan) and not self.plan[step]:
            self.skipped += 1
            return self.last
        self.last = self.forward(*args, **kwargs)
        return self.last


def fuse_qkv(module: Any) -> None:
    """Fuse the q/k/v (and added q/k/v) projections of every attention inside `module`, and drop the
    unfused copies diffusers keeps for unfusing (4 GiB of GPU memory on FLUX.1-dev, never used again)."""
    groups = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))
    for attn in list(module.modules()):
        if hasattr(attn, "fuse_projections") and getattr(attn, "_supports_qkv_fusion", False):
            attn.fuse_projections()
            for fused, parts in groups:
                if hasattr(attn, fused):
                    for name in parts:
                        setattr(attn, name, None)


def prepare_blocks(transformer: Any, fp8: bool) -> int:
    """Fuse (and for fp8 quantize) the repeated blocks one at a time on the GPU.

    Block by block: the fp8 memory profile loads the transformer in CPU memory, and moving one
    block at a time means the bf16 transformer is never on the GPU as a whole (24 GB cards); on
    the GPU, fusing and quantizing take about a second instead of half a minute on the CPU."""
    import torch

    from fluxstack.runtime.fp8 import quantize_linears

    count = 0
    seconds = {"move": 0.0, "fuse": 0.0, "quantize": 0.0}
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            t = time.perf_counter()
            block.to("cuda")
            t2 = time.perf_counter()
            fuse_qkv(block)
            t3 = time.perf_counter()
            if fp8:
                count += quantize_linears(block)
            seconds["move"] += t2 - t
            seconds["fuse"] += t3 - t2
            seconds["quantize"] += time.perf_counter() - t3
    torch.cuda.synchronize()
    PREPARE_SECONDS.update({k: round(v, 3) for k, v in seconds.items()})
    return count


def best_attention_backend(transformer: Any) -> str:
    """cuDNN attention when it runs here (fastest on Hopper for FLUX's 4608 tokens x 128 head dim),
    else PyTorch's default SDPA choice; returns the backend's name."""
    import torch

    try:
        q = torch.randn(1, 24, 256, 128, device="cuda", dtype=torch.bfloat16)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        transformer.set_attention_backend("_native_cudnn")
        return "_native_cudnn"
    except (RuntimeError, ValueError):
        return "native"


def compile_cache_dir(explicit: str | Path | None = None) -> Path:
    """Where compiled kernels persist across restarts (a volume in the container): --compile-cache,
    $FLUXSTACK_COMPILE_CACHE, else ~/.cache/fluxstack/torch-compile."""
    path = explicit or os.environ.get("FLUXSTACK_COMPILE_CACHE") or Path.home() / ".cache/fluxstack/torch-compile"
    return Path(path)


def use_compile_cache(path: Path) -> None:
    """Point Inductor's FX-graph/AOT caches and Triton's kernel cache at `path`. A warm cache turns
    minutes of compilation into seconds of loading; both read these variables when they compile."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def apply(pipe: Any, mode: str, profile: str, prepared: bool = False,
          on_event: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Turn a loaded pipeline (transformer on the GPU, or on the CPU for the fp8 profile) into `mode`.
    `prepared`: the transformer came from prepared weights (runtime/prepared.py), already fused and
    quantized on the GPU.

    Returns what was done, for /readyz and the benchmark."""
    import torch

    info: dict[str, Any] = {"mode": mode}
    if mode == "exact":
        return info
    transformer = pipe.transformer
    t = time.perf_counter()
    if prepared:
        from fluxstack.runtime.fp8 import Fp8Linear

        info["fp8_layers"] = sum(isinstance(m, Fp8Linear) for m in transformer.modules())
    else:
        # Embedders and the final layer are under 1% of the work and stay bf16.
        info["fp8_layers"] = prepare_blocks(transformer, fp8=mode in ("fp8", "fast"))
        info["prepare_parts_s"] = dict(PREPARE_SECONDS)
    transformer.to("cuda")
    torch.cuda.synchronize()
    info["prepare_s"] = round(time.perf_counter() - t, 3)
    info["attention"] = best_attention_backend(transformer)
    # Regional compilation: the 19 double and 38 single blocks share two compiled graphs, so the
    # first call compiles 2 blocks instead of 57 (and a warm cache loads 2 graphs). Static shapes:
    # each image size compiles once (then comes from the cache) instead of a slower dynamic graph.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    # The VAE decoder: 0.091 -> 0.039 s per 1024x1024 image on an H100. Compiled by the warm-up at the
    # default size; a second size makes it a dynamic-shape graph instead of one graph per size.
    pipe.vae.decoder.compile()
    if mode == "fast":
        info["step_cache"] = StepCache(transformer)
    on_event(f"performance mode {mode}: {info}")
    return info
