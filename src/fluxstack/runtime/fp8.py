"""float8 e4m3 linear layers for the fp8 performance modes (perf.py, prepared.py).

A module of its own because it imports torch at the top (perf.py must import without it, for the
CLI): the layer class has to be defined at module level. torch.compile's guards and caches name
types by their import path, and pickle (torch.save) cannot handle a class made inside a function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional

E4M3_MAX = 448.0  # largest finite float8_e4m3fn


class Fp8Linear(torch.nn.Module):
    """y = x W^T + b with W stored in float8 e4m3 and one float32 scale per output row.

    On CUDA the activations are quantized per token (row) on every call and multiplied on the
    fp8 tensor cores (torch._scaled_mm, rowwise scales); torch.compile fuses the quantization
    into the previous op's kernel. Elsewhere (tests on the CPU) W is dequantized instead."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter((w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX)
                                         .to(torch.float8_e4m3fn), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.reshape(1, -1), requires_grad=False)  # (1, N): _scaled_mm's
        self.bias = (torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
                     if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.is_cuda:
            rows = x2.shape[0]
            pad = -rows % 16  # cuBLASLt fp8 wants multiples of 16; the modulation layers see one row
            if pad:
                x2 = functional.pad(x2, (0, 0, 0, pad))
            x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
            xq = (x2.float() / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                   out_dtype=x.dtype)
            if pad:
                out = out[:rows]
        else:
            w = self.weight.to(x.dtype) * self.weight_scale.reshape(-1, 1).to(x.dtype)
            out = functional.linear(x2, w)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn rowwise"


def quantize_linears(module: Any) -> int:
    """Replace every linear layer inside `module` with an Fp8Linear (where it is; call it on GPU
    weights: quantizing 12B parameters on the CPU takes half a minute); returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                with torch.no_grad():
                    setattr(parent, name, Fp8Linear(child))
                count += 1
    return count
