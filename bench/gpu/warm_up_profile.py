"""Where the start-up warm-up spends its time on a warm compile cache (issue 4's cold start).

Loads the Engine as `fluxstack runtime serve` does but without its warm-up, then runs the warm-up
step (Engine._warm_up) alone under cProfile. Run it twice against one cache, in fresh processes:
the first fills the cache, the second shows what a restarted runtime pays (Dynamo tracing, loading
compiled kernels, the first cuBLAS/cuDNN calls). cProfile slows Python-heavy parts about 1.5-2x;
--no-profile gives the plain time.

    python bench/gpu/warm_up_profile.py --work /tmp/fluxbench --cache /tmp/cc --out warm.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from runtime_bench import DEV_DEFAULTS, make_store, variant

from fluxstack.runtime.engine import Engine


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/fluxbench"))
    parser.add_argument("--cache", type=Path, required=True, help="compile cache")
    parser.add_argument("--perf", default="fp8")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    v = variant(make_store(args.work, schnell=False), "flux-dev", DEV_DEFAULTS)
    engine = Engine([v], Path("/nonexistent"), "full", perf=args.perf, compile_cache=args.cache, warm_up=False)
    engine.load()
    torch.cuda.synchronize()
    profile = cProfile.Profile()
    t = time.monotonic()
    if not args.no_profile:
        profile.enable()
    engine._warm_up(v)
    torch.cuda.synchronize()
    if not args.no_profile:
        profile.disable()
    res: dict = {"warm_up_s": time.monotonic() - t, "profiled": not args.no_profile, "timings": engine.timings}
    if not args.no_profile:
        for key in ("cumulative", "tottime"):
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats(key).print_stats(70)
            res[key] = text.getvalue()
    args.out.write_text(json.dumps(res, indent=1))
    print(round(res["warm_up_s"], 2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
