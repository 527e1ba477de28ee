"""The fp8-attn mode's Triton kernel (runtime/attention8_triton.py) against the float32 torch code of the
same quantized arithmetic (attention8.reference), on FLUX's shapes and on awkward ones. Runs only where
a GPU with fp8 tensor cores is present; CI has none and covers the quantization and the processor on
the CPU (tests/unit/test_perf.py).
"""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs a GPU with fp8 tensor cores (CI has none)")]


def qkv(batch: int, tokens: int, temperature: float) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(tokens)
    q, k, v = (torch.randn(batch, tokens, 24, 128, device="cuda", generator=g) for _ in range(3))
    q, k = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) for x in (q, k))
    return (q * temperature).bfloat16(), k.bfloat16(), v.bfloat16()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(("batch", "tokens"), [(1, 4608), (1, 4352), (2, 1536), (1, 4481), (1, 77)])
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("v_fp8", [True, False])
def test_the_kernel_computes_what_the_reference_computes(batch: int, tokens: int, tma: bool, v_fp8: bool) -> None:
    from fluxstack.runtime import attention8, attention8_triton

    q, k, v = qkv(batch, tokens, 3.0)
    args = attention8.quantize(q, k, v, v_fp8=v_fp8)
    out = attention8_triton.attention_8bit(*args, attention8.P_SCALE, tma)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    # the same quantized inputs; the kernel's online softmax rounds probabilities per block, the
    # reference once per row, and both end in bf16
    assert rel(out, attention8.reference(*args)) < 0.01
    exact = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert rel(out, exact) < (0.06 if v_fp8 else 0.03)


def test_compiled_code_calls_the_kernel_as_one_op() -> None:
    from fluxstack.runtime import attention8

    q, k, v = qkv(1, 4608, 1.0)
    compiled = torch.compile(attention8.attention, fullgraph=True)
    assert rel(compiled(q, k, v), attention8.attention(q, k, v)) < 1e-2
