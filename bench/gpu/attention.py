"""8-bit attention candidates against the bf16 kernel the runtime uses, on FLUX.1's shapes (issue 4).

schnell at 0.40 s needs attention faster than cuDNN's bf16 flash kernel (docs/performance.md). This
times one attention call of FLUX.1 at 1024x1024 (24 heads of 128, 4096 image tokens plus 512 T5
tokens for dev or 256 for schnell, one joint sequence, no mask) with each candidate, and measures
its error against a float32 reference on inputs shaped like FLUX's (RMS-normed q and k):

  cudnn_bf16   PyTorch SDPA on cuDNN's flash kernel: what the runtime uses now
  flash_bf16   PyTorch SDPA on FlashAttention-2
  cudnn_fp8    cuDNN's fp8 flash kernel through the cuDNN frontend (pip nvidia-cudnn-frontend);
               per-tensor scales; on Hopper its output is fp8 as well
  triton_int8qk  the Triton kernel of attention8.py: q and k in int8 scaled per token, v (one
               scale) and probabilities in fp8, float32 accumulation, bf16 output
  triton_int8qk_pointers  the same with plain loads instead of Hopper's TMA
  triton_fp8   the same kernel with q and k in fp8 e4m3 (per token): 3 mantissa bits for the logits
  triton_int8qk_bf16pv  int8 q and k, bf16 probabilities and v: only the first product in 8 bits
  sage         SageAttention 1 (pip sageattention): int8 q and k, fp16 probabilities and v

Each candidate's time is reported for the kernel alone and with the quantization of its inputs
done by eager PyTorch (compiled blocks would fuse most of it into the q/k norm + RoPE kernel). A
candidate that cannot run here records why instead of a time. Results and what they decided:
docs/performance.md ("schnell at 0.40 s").

    python bench/gpu/attention.py --out attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attention8
from kernel_timing import cuda_ms

HEADS, HEAD_DIM = 24, 128
IMAGE_TOKENS = 4096  # 1024x1024: a 64x64 latent in 2x2 patches
TEXT_TOKENS = {"dev": 512, "schnell": 256}
P_SCALE = attention8.P_SCALE


def flux_like(tokens: int, temperature: float, seed: int) -> tuple[torch.Tensor, ...]:
    """bf16 q, k, v in FLUX's layout (batch, tokens, heads, head_dim). q and k are RMS-normed per
    head as FLUX's attention does; `temperature` scales q, so the logits' spread is about its
    value (1: nearly uniform attention, 4: peaked)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, tokens, HEADS, HEAD_DIM, device="cuda", generator=g) for _ in range(3))
    q, k = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) for x in (q, k))
    return (q * temperature).bfloat16(), k.bfloat16(), v.bfloat16()


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 attention, one head at a time (the full score matrix would take 2 GiB per head group)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for h in range(q.shape[2]):
        qh, kh, vh = (x[:, :, h].float() for x in (q, k, v))
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(HEAD_DIM)
        out[:, :, h] = scores.softmax(-1) @ vh
    return out


# -- SDPA (bf16) ---------------------------------------------------------------------------------
def sdpa(backend: SDPBackend) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        return tuple(x.transpose(1, 2) for x in (q, k, v))  # what diffusers' native backends pass

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    return prepare, run


# -- the Triton kernels of attention8.py ---------------------------------------------------------
def triton_8bit(qk_dtype: torch.dtype, v_fp8: bool = True,
                tma: bool = True) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        return attention8.quantize(q, k, v, qk_dtype, v_fp8)

    def run(*args: torch.Tensor) -> torch.Tensor:
        return attention8.attention_8bit(*args, attention8.P_SCALE, tma)

    return prepare, run


# -- cuDNN fp8 (frontend) ------------------------------------------------------------------------
def cudnn_fp8(q: torch.Tensor) -> tuple[Callable[..., Any], Callable[..., Any]]:
    import cudnn

    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    batch, tokens, heads, dim = q.shape
    dims, strides = [batch, heads, tokens, dim], [tokens * heads * dim, dim, heads * dim, 1]  # BSHD memory
    tq, tk, tv = (graph.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in "qkv")
    scalars = [graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
               for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
    out, _, amax_s, amax_o = graph.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=scalars[0], descale_k=scalars[1],
                                            descale_v=scalars[2], descale_s=scalars[3], scale_s=scalars[4],
                                            scale_o=scalars[5], is_inference=True, attn_scale=1 / math.sqrt(dim),
                                            use_causal_mask=False, name="sdpa")
    out.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device="cuda")
    one = torch.ones(1, 1, 1, 1, device="cuda")
    s_scale = one * P_SCALE
    s_descale = one / P_SCALE
    amaxes = [torch.empty_like(one), torch.empty_like(one)]
    o8 = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device="cuda")

    def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        (q8, qd), (k8, kd), (v8, vd) = (attention8.per_tensor(x) for x in (q, k, v))
        # The output is a convex combination of v's rows, so |o| <= max|v|: v's own scale keeps o
        # in range, halved for the rounding of the quantized probabilities.
        qd, kd, vd = (x.reshape(1, 1, 1, 1) for x in (qd, kd, vd))
        return q8, k8, v8, qd, kd, vd, 0.5 / vd

    def run(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, qd: torch.Tensor, kd: torch.Tensor,
            vd: torch.Tensor, o_scale: torch.Tensor) -> torch.Tensor:
        graph.execute({tq: q8, tk: k8, tv: v8, scalars[0]: qd, scalars[1]: kd, scalars[2]: vd,
                       scalars[3]: s_descale, scalars[4]: s_scale, scalars[5]: o_scale, out: o8,
                       amax_s: amaxes[0], amax_o: amaxes[1]}, workspace, handle=handle)
        return o8.to(torch.bfloat16) * (1 / o_scale).to(torch.bfloat16)

    run.meta = {"cudnn_backend": cudnn.backend_version_string(), "workspace_bytes": workspace.numel(),
                "output": "float8_e4m3fn, dequantized to bf16 (included in the kernel time)"}
    return prepare, run


def sage() -> tuple[Callable[..., Any], Callable[..., Any]]:
    from sageattention import sageattn

    def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        return q, k, v  # sageattn quantizes inside its call

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    return prepare, run


# -- measuring -----------------------------------------------------------------------------------
def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def measure(name: str, build: Callable[[torch.Tensor], tuple], tokens: int,
            temperatures: tuple[float, ...]) -> dict[str, Any]:
    q, k, v = flux_like(tokens, 1.0, seed=0)
    try:
        prepare, run = build(q)  # cuDNN builds its graph for q's shape
        args = prepare(q, k, v)
        kernel_ms = cuda_ms(lambda: run(*args))
        total_ms = cuda_ms(lambda: run(*prepare(q, k, v)))
    except Exception as exc:  # noqa: BLE001 (a candidate that cannot run here is a result, not a failure)
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    flops = 4 * q.shape[0] * HEADS * tokens * tokens * HEAD_DIM
    result: dict[str, Any] = {"kernel_ms": round(kernel_ms, 4), "with_quantization_ms": round(total_ms, 4),
                              "kernel_tflops": round(flops / kernel_ms / 1e9, 1)}
    result.update(getattr(run, "meta", {}))
    for t in temperatures:
        qt, kt, vt = flux_like(tokens, t, seed=1)
        result[f"rel_error_t{t:g}"] = round(rel_error(run(*prepare(qt, kt, vt)), reference(qt, kt, vt)), 5)
    if name.startswith("triton"):
        kernel = attention8.attention_kernel if "pointers" in name else attention8.attention_kernel_tma
        result["config"] = str(kernel.best_config)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", help="candidates to run (default: all)")
    args = parser.parse_args()
    candidates: dict[str, Callable[[torch.Tensor], tuple]] = {
        "cudnn_bf16": lambda _: sdpa(SDPBackend.CUDNN_ATTENTION),
        "flash_bf16": lambda _: sdpa(SDPBackend.FLASH_ATTENTION),
        "cudnn_fp8": cudnn_fp8,
        "triton_fp8": lambda _: triton_8bit(torch.float8_e4m3fn),
        "triton_int8qk": lambda _: triton_8bit(torch.int8),
        "triton_int8qk_pointers": lambda _: triton_8bit(torch.int8, tma=False),
        "triton_int8qk_bf16pv": lambda _: triton_8bit(torch.int8, v_fp8=False),
        "sage": lambda _: sage(),
    }
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__, "python": platform.python_version(),
        "torch_has_cudnn_fp8_sdpa": hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_quantized_per_tensor"),
        "shapes": {},
    }
    for variant, text in TEXT_TOKENS.items():
        tokens = text + IMAGE_TOKENS
        shape = results["shapes"][f"{variant} ({tokens} tokens)"] = {}
        for name, build in candidates.items():
            if args.only and name not in args.only:
                continue
            shape[name] = measure(name, build, tokens, temperatures=(1.0, 4.0))
            print(variant, name, shape[name], flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
