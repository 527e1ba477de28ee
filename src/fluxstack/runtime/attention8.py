"""8-bit attention for the `fp8-attn` performance mode (perf.py).

FLUX's joint attention (24 heads of 128 over 4096 image + 512 text tokens at 1024x1024) is a
quarter of an fp8 step on an H100 with cuDNN's bf16 flash kernel (docs/performance.md). Here both
of its products run on the 8-bit tensor cores, at twice the bf16 rate:

  q k^T  q and k in int8 with one scale per token and head, k less its mean over the tokens. FLUX
         normalizes q and k (RMSNorm) before this product, so every row spans a similar range and
         int8's 8 uniform bits keep the logits about 4x more precise than float8 e4m3's 3 mantissa
         bits (bench/gpu/attention.py).
  p v    the softmax probabilities times 256 and v (one scale per call) in float8 e4m3.

Accumulation is float32 and the output bf16. The quantization is plain torch code, so the compiled
blocks fuse it into the kernel that normalizes q and k and applies RoPE; the attention itself is
the Triton kernel of attention8_triton, an opaque op to torch.compile. On the CPU (tests) the same
quantized values go through float attention instead: CI has no GPU, the kernel needs one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional

E4M3_MAX = 448.0
INT8_MAX = 127.0
P_SCALE = 256.0  # probabilities in [0, 1] times this stay in e4m3's normal range down to 2^-14
LOG2E = 1.4426950408889634  # the kernel takes exp2
TMA = True  # tiles moved by Hopper's TMA (bench/gpu/attention.py compares it with plain loads)


def per_token(x: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (batch, tokens, heads, d) in int8 or float8 e4m3 scaled by each token and head's absolute
    maximum, and those scales (batch, tokens, heads) in float32, multiplied by `factor`."""
    top = INT8_MAX if dtype == torch.int8 else E4M3_MAX
    amax = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)
    scaled = x.float() * (top / amax)
    if dtype == torch.int8:
        scaled = scaled.round()
    return scaled.clamp(-top, top).to(dtype), (amax * (factor / top)).squeeze(-1)


def per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x in float8 e4m3 scaled by its absolute maximum, and the descale (one float32)."""
    amax = x.abs().amax().float().clamp(min=1e-12)
    return (x.float() * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), \
        (amax / E4M3_MAX).reshape(1)


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_dtype: torch.dtype = torch.int8,
             v_fp8: bool = True) -> tuple[torch.Tensor, ...]:
    """The kernel's inputs from bf16 q, k, v (batch, tokens, heads, d): q8, k8, v transposed to
    (batch, heads, d, tokens) in fp8 (or left bf16), q's scales (with the softmax scale and log2(e)
    folded in), k's scales and v's descale."""
    q8, qs = per_token(q, qk_dtype, factor=LOG2E / math.sqrt(q.shape[-1]))
    # Subtracting k's mean over the tokens changes every logit of a query by the same amount, which
    # the softmax cancels, and leaves int8 the spread around a shared offset (SageAttention's "smooth
    # k": trained models' keys often share one).
    k8, ks = per_token(k.float() - k.float().mean(dim=1, keepdim=True), qk_dtype)
    v8, vd = per_tensor(v) if v_fp8 else (v, torch.ones(1, device=v.device))
    # TMA wants 16-byte aligned rows: pad v's storage to a multiple of 16 tokens, not its shape.
    tokens = v.shape[1]
    vt8 = functional.pad(v8.permute(0, 2, 3, 1), (0, -tokens % 16))[..., :tokens]
    return q8, k8, vt8, qs.contiguous(), ks.contiguous(), vd


def reference(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, qs: torch.Tensor, ks: torch.Tensor,
              vd: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float32 torch: the CPU's path, and the tests' yardstick."""
    q = q8.float() * qs.unsqueeze(-1)
    k = k8.float() * ks.unsqueeze(-1)
    logits = torch.einsum("bshd,bthd->bhst", q, k)  # in log2 units: q's scales include log2(e)
    p = torch.exp2(logits - logits.amax(-1, keepdim=True))
    total = p.sum(-1, keepdim=True)
    if vt8.dtype == torch.float8_e4m3fn:
        p = (p * P_SCALE).to(torch.float8_e4m3fn).float() / P_SCALE
    out = torch.einsum("bhst,bhdt->bshd", p / total, vt8.float() * vd)
    return out.to(torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of bf16 q, k, v (batch, tokens, heads, d) with 8-bit products; bf16 out, same layout."""
    args = quantize(q, k, v)
    if q.is_cuda:
        return torch.ops.fluxstack.attention_8bit(*args, P_SCALE, TMA)
    return reference(*args)


class EightBitAttnProcessor:
    """diffusers' FluxAttnProcessor (0.42) with the attention call replaced by attention()."""

    _attention_backend = None  # diffusers sets these on every processor; this one has its own kernel
    _parallel_config = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> Any:
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("8-bit attention has no mask; FLUX.1's text-to-image and editing pipelines pass none")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = attention(query, key, value).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))  # projection, dropout
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def use_8bit_attention(transformer: Any) -> int:
    """Give every FLUX attention of `transformer` the 8-bit processor; returns how many."""
    if next(transformer.parameters()).is_cuda:
        import fluxstack.runtime.attention8_triton  # noqa: F401 (registers torch.ops.fluxstack.attention_8bit)
    count = 0
    for module in transformer.modules():
        if type(module).__name__ == "FluxAttention":
            module.set_processor(EightBitAttnProcessor())
            count += 1
    return count
