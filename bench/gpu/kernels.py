"""Where a compiled mode's GPU time goes, and whether CUDA graphs would help (issue 4).

Builds the Engine as `fluxstack runtime serve` does (load, perf mode, warm-up), times FLUX.1-dev
1024x1024 through Engine.generate (28 steps with 512 T5 tokens, and the schnell shape: 4 steps, 256
tokens; medians of --runs after one more), then profiles one 4-step image with torch.profiler and
sums the GPU kernels' own time by kind:

  gemm       cuBLAS/cuBLASLt matrix multiplications (fp8 `_scaled_mm` and bf16) and the VAE's
             implicit-GEMM convolutions
  attention  the SDPA kernels (cuDNN flash attention on H100; the VAE's memory-efficient one)
  triton     Inductor's fused element-wise/reduction kernels: norms, modulation, RoPE, GELU and the
             per-token fp8 quantization of every linear layer's input
  other      the rest (the VAE's convolutions, copies)

With --graphs, the whole transformer call is then captured in one CUDA graph per input shape (replayed
with the step's inputs copied in) and timed again, to see how much launch overhead is left.

With --persistent-up-to N, Inductor makes every row reduction up to N elements wide one-pass
("persistent": the row stays in registers) instead of its own limit of 1024; the per-token fp8
quantization reduces rows 3072-15360 wide. Use a fresh --cache: the choice is not part of
Inductor's cache key.

    python bench/gpu/kernels.py --work /tmp/fluxbench --cache /tmp/cc --perf fp8 --graphs --out k.json
Inductor settings come from the environment, e.g. TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 or
TORCHINDUCTOR_MULTI_KERNEL=1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from runtime_bench import DEV_DEFAULTS, make_store, timed, variant

from fluxstack.runtime.engine import Engine, Job, NonFinite


def kind(kernel: str) -> str:
    low = kernel.lower()
    if kernel.startswith("triton_"):  # before gemm: Inductor names kernels after the ops they feed
        return "triton"
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa")):  # before gemm: fmha_cutlass* is attention
        return "attention"
    if any(k in low for k in ("gemm", "cutlass", "sm90_xmma", "scaled_mm", "nvjet", "f8f8")):
        return "gemm"
    return "other"


def persistent_reductions_up_to(width: int) -> None:
    """Make Inductor compile row reductions up to `width` elements as one-pass (persistent) kernels."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WideRows(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            return (torch._inductor.config.triton.persistent_reductions and not cooperative_reduction
                    and features.get_reduction_hint() == ReductionHint.INNER
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, width))

    V.set_choices_handler(WideRows())


class GraphedTransformer:
    """The transformer's forward replayed from one CUDA graph per input shape."""

    def __init__(self, transformer: Any) -> None:
        self.forward = transformer.forward
        self.graphs: dict[tuple, tuple] = {}
        transformer.forward = self

    def __call__(self, **kwargs: Any) -> Any:
        key = tuple((k, tuple(x.shape), x.dtype) if torch.is_tensor(x) else (k, repr(x))
                    for k, x in sorted(kwargs.items()))
        if key not in self.graphs:
            out = self.forward(**kwargs)
            static = {k: (x.clone() if torch.is_tensor(x) else x) for k, x in kwargs.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.forward(**static)
            self.graphs[key] = (graph, static, static_out)
            return out
        graph, static, static_out = self.graphs[key]
        for k, x in kwargs.items():
            if torch.is_tensor(x):
                static[k].copy_(x)
        graph.replay()
        return tuple(o.clone() for o in static_out)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/fluxbench"))
    parser.add_argument("--cache", type=Path, required=True, help="compile cache (empty: compiles first)")
    parser.add_argument("--perf", default="fp8")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--graphs", action="store_true", help="also time the transformer replayed from CUDA graphs")
    parser.add_argument("--persistent-up-to", type=int, metavar="N",
                        help="one-pass (persistent) reductions for rows up to N elements (Inductor: 1024)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.persistent_up_to:
        persistent_reductions_up_to(args.persistent_up_to)
    v = variant(make_store(args.work, schnell=False), "flux-dev", DEV_DEFAULTS)
    engine = Engine([v], Path("/nonexistent"), "full", perf=args.perf, compile_cache=args.cache)
    engine.load()
    res: dict[str, Any] = {"mode": engine.perf, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "inductor_env": {k: val for k, val in os.environ.items() if k.startswith("TORCHINDUCTOR")},
                           "persistent_up_to": args.persistent_up_to,
                           "timings": engine.timings}

    def job(steps: int, msl: int) -> Job:
        return Job(variant=v.name, prompt="A cat holding a sign", width=1024, height=1024, steps=steps,
                   guidance=3.5, seed=0, n=1, max_sequence_length=msl)

    def generate(steps: int, msl: int) -> None:
        with contextlib.suppress(NonFinite):  # random weights may overflow; the time is the full path's
            engine.generate(job(steps, msl))

    def median_s(steps: int = 28, msl: int = 512) -> float:
        return statistics.median(timed(lambda: generate(steps, msl), args.runs + 1)[1:])

    res["e2e_28"], res["e2e_schnell4"] = median_s(), median_s(4, 256)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        generate(4, 512)
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.self_device_time_total <= 0:
            continue  # operators: their kernels are counted as kernels
        by_kind[kind(event.key)] += event.self_device_time_total
        per_kernel[event.key] += event.self_device_time_total
        calls[event.key] += event.count
    res["kernel_ms_4steps_by_kind"] = {k: round(us / 1000, 2) for k, us in by_kind.items()}
    res["top_kernels_ms"] = [(k[:120], round(us / 1000, 2), calls[k])
                             for k, us in sorted(per_kernel.items(), key=lambda x: -x[1])[:40]]
    if args.graphs:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        GraphedTransformer(engine.pipes[v.name].transformer)
        res["graphs_e2e_28"], res["graphs_e2e_schnell4"] = median_s(), median_s(4, 256)
        res["graphs_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps({k: val for k, val in res.items() if k != "top_kernels_ms"}), flush=True)
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
