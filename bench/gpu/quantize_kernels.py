"""The fused kernels that feed the fp8 linear layers, with the row maximum in one go (as
fp8.Fp8Linear computes it) or in 1024-wide chunks, on FLUX.1's shapes (issue 4).

docs/performance.md: the GELU + concatenation + quantization kernel before the single blocks' output
projection took 16 ms of a 107 ms fp8 step, about 3x what its memory traffic needs. Each pattern here
is what the blocks compute before an Fp8Linear, compiled by Inductor as the runtime compiles the blocks,
timed alone (CUDA events, median), once per way of taking the row maximum (chunk 0: whole rows):

  single_tail  cat(attention output 3072, GELU(MLP 12288)) -> quantize 15360-wide rows
  mlp_out      GELU(12288) -> quantize (the MLP's second layer)
  norm_mod     LayerNorm(3072) * (1 + scale) + shift -> quantize (the blocks' first layers)

    python bench/gpu/quantize_kernels.py --out quantize.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from kernel_timing import cuda_ms

from fluxstack.runtime import fp8

CHUNK = 0  # the width of the chunks of each row's maximum; 0: whole rows (the runtime's way)
TOKENS = 4608  # FLUX.1-dev at 1024x1024: 4096 image + 512 text tokens
WIDTH, MLP = 3072, 12288


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # What Fp8Linear.forward does before torch._scaled_mm, with the row maximum taken as CHUNK says.
    rows, width = x.shape
    if CHUNK and width > CHUNK and width % CHUNK == 0:
        amax = x.abs().reshape(rows, width // CHUNK, CHUNK).amax(dim=2).amax(dim=1, keepdim=True)
    else:
        amax = x.abs().amax(dim=1, keepdim=True)
    scale = amax.float().clamp(min=1e-12) / fp8.E4M3_MAX
    return (x.float() / scale).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(torch.float8_e4m3fn), scale


def single_tail(attn: torch.Tensor, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize(torch.cat([attn, torch.nn.functional.gelu(mlp, approximate="tanh")], dim=-1))


def mlp_out(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize(torch.nn.functional.gelu(h, approximate="tanh"))


def norm_mod(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize(torch.nn.functional.layer_norm(x, (WIDTH,), eps=1e-6) * (1 + scale) + shift)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    global CHUNK
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    patterns = {
        "single_tail": (single_tail, (randn(TOKENS, WIDTH), randn(TOKENS, MLP))),
        "mlp_out": (mlp_out, (randn(TOKENS, MLP),)),
        "norm_mod": (norm_mod, (randn(TOKENS, WIDTH), randn(1, WIDTH), randn(1, WIDTH))),
    }
    results: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": TOKENS}
    for name, (fn, inputs) in patterns.items():
        quantized_width = sum(x.shape[-1] for x in inputs if x.shape[0] == TOKENS)
        moved = sum(x.numel() * x.element_size() for x in inputs) + TOKENS * quantized_width  # read once, fp8 out
        row: dict[str, object] = {"bytes_moved_min": moved}
        outputs = {}
        for chunk in (0, 1024):
            CHUNK = chunk
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            outputs[chunk] = compiled(*inputs)
            ms = cuda_ms(lambda compiled=compiled, inputs=inputs: compiled(*inputs), calls=50, warmup=5)
            row[f"chunk_{chunk}_ms"] = round(ms, 4)
            row[f"chunk_{chunk}_gbps"] = round(moved / ms / 1e6, 1)
        row["same_bits"] = all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
                               for a, b in zip(outputs[0], outputs[1024], strict=True))
        results[name] = row
        print(name, row, flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
