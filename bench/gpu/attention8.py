"""8-bit attention kernels for bench/gpu/attention.py: an experiment for issue 4, not runtime code.

Measured on an H100 (bench/results/attention-h100-20261207b.json, docs/performance.md), none of these
beats cuDNN's bf16 flash attention at FLUX.1's shapes, so no performance mode uses them:

  q k^T  q and k in int8 (or float8 e4m3) with one scale per token and head, k less its mean over
         the tokens (softmax-invariant; SageAttention's "smooth k").
  p v    the softmax probabilities times 256 and v (one scale per call) in float8 e4m3, or both bf16.

Accumulation is float32 and the output bf16. `reference` is the same quantized arithmetic in float32
torch; the kernel runs on the CPU under TRITON_INTERPRET=1 (whose fp8 rounding and bf16 dot differ
from the GPU's, so compare there with fp16 probabilities).
"""

# ruff: noqa: N803 (Triton's compile-time parameters are upper case by convention)
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.nn import functional
from triton.tools.tensor_descriptor import TensorDescriptor

E4M3_MAX = 448.0
INT8_MAX = 127.0
P_SCALE = 256.0  # probabilities in [0, 1] times this stay in e4m3's normal range down to 2^-14
LOG2E = 1.4426950408889634  # the kernel takes exp2


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
    vt8 = functional.pad(v8.permute(0, 2, 3, 1), (0, -tokens % 16)).contiguous()[..., :tokens]  # pad 0: a view
    return q8, k8, vt8, qs.contiguous(), ks.contiguous(), vd


def reference(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, qs: torch.Tensor, ks: torch.Tensor,
              vd: torch.Tensor) -> torch.Tensor:
    """What the kernels compute, in float32 torch: to check them against, on any device."""
    q = q8.float() * qs.unsqueeze(-1)
    k = k8.float() * ks.unsqueeze(-1)
    logits = torch.einsum("bshd,bthd->bhst", q, k)  # in log2 units: q's scales include log2(e)
    p = torch.exp2(logits - logits.amax(-1, keepdim=True))
    total = p.sum(-1, keepdim=True)
    if vt8.dtype == torch.float8_e4m3fn:
        p = (p * P_SCALE).to(torch.float8_e4m3fn).float() / P_SCALE
    out = torch.einsum("bhst,bhdt->bshd", p / total, vt8.float() * vd)
    return out.to(torch.bfloat16)


# Block shapes tried on the first call of each sequence length: few, since each is a compilation.
CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
           for m, n, w, s in ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
                              (128, 64, 4, 3), (128, 128, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3))]


@triton.jit
def _attend(q, k, vt, qs, ks, keys, tokens, m_i, l_i, acc, P_SCALE: tl.constexpr):
    # One block of keys for a block of queries: the logits in log2 units, the online softmax's new
    # row maxima and sums (FlashAttention-2), and the probabilities times v added to acc.
    qk = tl.dot(q, tl.trans(k)).to(tl.float32) * qs[:, None] * ks[None, :]
    qk = tl.where(keys[None, :] < tokens, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot((p * P_SCALE).to(vt.dtype), tl.trans(vt), acc * alpha[:, None])
    return m_new, l_i, acc


@triton.autotune(configs=CONFIGS, key=["tokens", "HEAD_DIM"], cache_results=True)
@triton.jit
def attention_kernel(q_ptr, k_ptr, vt_ptr, out_ptr, q_scale, k_scale, v_descale, tokens,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vh, stride_vd, stride_ob, stride_os, stride_oh,
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, P_SCALE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program: BLOCK_M queries of one head against all keys.
    # q, k: (batch, tokens, heads, d), int8 or fp8, one scale per token and head ((batch, tokens,
    # heads) float32; q's includes the softmax scale and log2(e)); vt: (batch, heads, d, tokens)
    # fp8 with one scale (or bf16), laid out so that both dots read their second operand along the
    # reduced dimension, as Hopper's 8-bit MMA requires. Probabilities go to v's dtype times P_SCALE.
    start_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + dims[None, :],
                mask=rows[:, None] < tokens, other=0.0)
    qs = tl.load(q_scale + (b * tokens + rows) * HEADS + h, mask=rows < tokens, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = vt_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, tokens, BLOCK_N):
        keys = start_n + cols
        k = tl.load(k_base + keys[:, None] * stride_ks + dims[None, :], mask=keys[:, None] < tokens, other=0.0)
        ks = tl.load(k_scale + (b * tokens + keys) * HEADS + h, mask=keys < tokens, other=0.0)
        vt = tl.load(v_base + dims[:, None] * stride_vd + keys[None, :], mask=keys[None, :] < tokens, other=0.0)
        m_i, l_i, acc = _attend(q, k, vt, qs, ks, keys, tokens, m_i, l_i, acc, P_SCALE)
    out = acc * (tl.load(v_descale) / P_SCALE / l_i)[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rows[:, None] < tokens)


def _tma_blocks(nargs: dict) -> None:
    """Autotuning's pre-hook: the descriptors' block shapes follow the configuration's."""
    m, n, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    nargs["q_desc"].block_shape = nargs["o_desc"].block_shape = [1, m, d]
    nargs["k_desc"].block_shape = [1, n, d]
    nargs["v_desc"].block_shape = [1, d, n]


TMA_CONFIGS = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_tma_blocks)
               for c in CONFIGS]


@triton.autotune(configs=TMA_CONFIGS, key=["tokens", "HEAD_DIM"], cache_results=True)
@triton.jit
def attention_kernel_tma(q_desc, k_desc, v_desc, o_desc, q_scale, k_scale, v_descale, tokens,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, P_SCALE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # attention_kernel with the tiles moved by Hopper's tensor memory accelerator (TMA): q, k and the
    # output as (batch, tokens, heads * d), vt as (batch, heads * d, tokens); tiles past the last
    # token load as zeros and are not stored.
    start_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    q = q_desc.load([b, start_m * BLOCK_M, h * HEAD_DIM]).reshape(BLOCK_M, HEAD_DIM)
    qs = tl.load(q_scale + (b * tokens + rows) * HEADS + h, mask=rows < tokens, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, tokens, BLOCK_N):
        keys = start_n + cols
        k = k_desc.load([b, start_n, h * HEAD_DIM]).reshape(BLOCK_N, HEAD_DIM)
        ks = tl.load(k_scale + (b * tokens + keys) * HEADS + h, mask=keys < tokens, other=0.0)
        vt = v_desc.load([b, h * HEAD_DIM, start_n]).reshape(HEAD_DIM, BLOCK_N)
        m_i, l_i, acc = _attend(q, k, vt, qs, ks, keys, tokens, m_i, l_i, acc, P_SCALE)
    out = acc * (tl.load(v_descale) / P_SCALE / l_i)[:, None]
    o_desc.store([b, start_m * BLOCK_M, h * HEAD_DIM], out.to(o_desc.dtype).reshape(1, BLOCK_M, HEAD_DIM))


def attention_8bit(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, qs: torch.Tensor, ks: torch.Tensor,
                   vd: torch.Tensor, p_scale: float, tma: bool) -> torch.Tensor:
    batch, tokens, heads, dim = q8.shape
    out = torch.empty(q8.shape, dtype=torch.bfloat16, device=q8.device)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads

    with torch.cuda.device(q8.device):
        if tma:
            flat = [batch, tokens, heads * dim]
            q_desc, k_desc, o_desc = (TensorDescriptor(x, flat, [x.stride(0), x.stride(1), 1], [1, 16, 16])
                                      for x in (q8, k8, out))
            v_desc = TensorDescriptor(vt8, [batch, heads * dim, tokens], [vt8.stride(0), vt8.stride(2), 1],
                                      [1, 16, 16])  # block shapes: _tma_blocks sets them per configuration
            attention_kernel_tma[grid](q_desc, k_desc, v_desc, o_desc, qs, ks, vd, tokens,
                                       HEADS=heads, HEAD_DIM=dim, P_SCALE=p_scale)
        else:
            attention_kernel[grid](q8, k8, vt8, out, qs, ks, vd, tokens,
                                   *q8.stride()[:3], *k8.stride()[:3], *vt8.stride()[:3], *out.stride()[:3],
                                   HEADS=heads, HEAD_DIM=dim, P_SCALE=p_scale)
    return out
