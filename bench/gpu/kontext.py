"""FLUX.1 Kontext (image edit) in a compiled mode: does the start-up warm-up cover a default request?

Builds the Engine as `fluxstack runtime serve` does for an image-edit variant (FluxKontextPipeline,
the FLUX.1-dev-shaped transformer: Kontext's has the same shapes), which warms up with a blank input
image at the default size. Then it times --runs edit requests, 1024x1024 in and out, 28 steps: if the
warm-up compiled the shape the requests use, the first takes as long as the others.

    python bench/gpu/kontext.py --work /tmp/fluxbench --cache /tmp/cc --perf fp8 --out kontext.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from PIL import Image
from runtime_bench import DEV_DEFAULTS, make_store, timed, variant

from fluxstack.runtime.engine import Engine, Job, NonFinite


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/fluxbench"))
    parser.add_argument("--cache", type=Path, required=True, help="compile cache")
    parser.add_argument("--perf", default="fp8")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    v = dataclasses.replace(variant(make_store(args.work, schnell=False), "flux-kontext-dev",
                                    DEV_DEFAULTS | {"guidance": 2.5}), task="image-edit")
    t = time.monotonic()
    engine = Engine([v], Path("/nonexistent"), "full", perf=args.perf, compile_cache=args.cache)
    engine.load()
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "mode": engine.perf,
           "load_and_warm_up_s": time.monotonic() - t, "timings": engine.timings,
           "request": "28 steps, 1024x1024 input image and output, 512 T5 tokens, end to end (PNG included)"}
    image = Image.new("RGB", (1024, 1024), (30, 90, 200))

    def edit() -> None:
        with contextlib.suppress(NonFinite):  # random weights may overflow; the time is the full path's
            engine.generate(Job(variant=v.name, prompt="make it red", width=1024, height=1024, steps=28,
                                guidance=2.5, seed=0, n=1, max_sequence_length=512, image=image))

    runs = timed(edit, args.runs)
    res |= {"first_request_s": runs[0], "steady_s": statistics.median(runs[1:]), "runs_s": runs,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
