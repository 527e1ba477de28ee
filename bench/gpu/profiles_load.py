"""Load the runtime in memory profiles other than `full` and generate one small image with each, on a
GPU: the path the 24 GB cards (`fp8` profile) and offload profiles take, where T5 is read ahead to CPU
memory (converted from fp16 to bf16 on arrival) and built on the meta device. A correctness check with
timings, not a speed benchmark.

    python bench/gpu/profiles_load.py fp8 model-offload
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from runtime_bench import DEV_DEFAULTS, make_store, variant

from fluxstack.runtime.engine import Engine, Job, NonFinite


def main() -> int:
    v = variant(make_store(Path("/tmp/fluxbench"), schnell=False), "flux-dev", DEV_DEFAULTS)
    for profile in sys.argv[1:]:
        t = time.time()
        engine = Engine([v], Path("/nonexistent"), profile, perf="exact")
        engine.load()
        load = time.time() - t
        t = time.time()
        try:
            engine.generate(Job(variant=v.name, prompt="a cat", width=512, height=512, steps=4, guidance=3.5, seed=0,
                                n=1, max_sequence_length=512))
            out = "png"
        except NonFinite:
            out = "nonfinite (random weights)"
        t5 = engine.pipes[v.name].text_encoder_2
        print(json.dumps({"profile": profile, "load_s": round(load, 1), "gen_s": round(time.time() - t, 1), "out": out,
                          "t5_device": str(next(t5.parameters()).device), "t5_dtype": str(t5.dtype),
                          "startup": engine.startup(), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}),
              flush=True)
        del engine, t5
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
