"""Cold start: process start to first image, with the weights in the page cache (issue 4).

Runs the runtime twice as fresh processes against one compile-cache folder: the first run finds
it empty (unless an earlier invocation filled it) and compiles, the second finds what the first
stored (what a restarted container with the cache on a volume sees). Each child builds the Engine
exactly as `fluxstack runtime serve` does (load, quantize, compile or load compiled kernels, one
warm-up step), then generates one FLUX.1-dev 1024x1024 28-step image through Engine.generate.
Times are from just before the child process is spawned.

    python bench/gpu/cold_start.py --work /tmp/fluxbench --perf fp8 --cache /tmp/cc --out cold.json

--bytecode DIR first compiles torch's, diffusers' and transformers' site-packages and our sources to
bytecode under DIR (untimed) and runs the processes with PYTHONPYCACHEPREFIX=DIR, as in the runtime
image, which installs its packages with bytecode compiled: a host Python without .pyc files
otherwise compiles sources on every start.

--only-locked LOCK hides from the processes every installed distribution that LOCK (the image's
requirements/runtime.lock) does not name. diffusers and transformers import optional packages
when they find them (scipy, scikit-learn, pandas, ...), which a GPU host's Python may carry and the
image does not, so the host's import time alone says little about the image's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

T0 = time.time()


def child(args: argparse.Namespace) -> None:
    if args.hide:
        hidden = json.loads(args.hide.read_text())
        hide(set(hidden["hidden"]), set(hidden["hidden_distributions"]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    import torch
    from runtime_bench import DEV_DEFAULTS, store_paths, variant

    from fluxstack.runtime.engine import Engine, Job, NonFinite

    stamps = {"imported": time.time()}
    # The files exist already (the parent wrote them, untimed): like `runtime serve`, only read them.
    v = variant(store_paths(args.work, schnell=False), "flux-dev", DEV_DEFAULTS)
    stamps["store_checked"] = time.time()
    engine = Engine([v], Path("/nonexistent"), args.profile, perf=args.perf, compile_cache=args.cache,
                    prepared_weights=not args.no_prepared_weights, read_threads=args.read_threads)
    engine.load()  # load + quantize + compile (or cache hit) + warm-up step: /readyz turns ready here
    torch.cuda.synchronize()
    stamps["ready"] = time.time()
    job = Job(variant=v.name, prompt="A cat holding a sign that says hello world", width=1024, height=1024,
              steps=28, guidance=3.5, seed=0, n=1, max_sequence_length=512)
    with contextlib.suppress(NonFinite):  # random weights may overflow; the time is the full path's
        engine.generate(job)
    torch.cuda.synchronize()
    stamps["first_image"] = time.time()
    t = time.time()
    with contextlib.suppress(NonFinite):  # random weights may overflow; the time is the full path's
        engine.generate(job)
    torch.cuda.synchronize()
    stamps["second_image_s"] = time.time() - t
    peak = torch.cuda.max_memory_allocated() / 2**30
    from torch._dynamo.utils import counters

    stamps["engine_timings"] = engine.timings
    stamps["load_parts_s"] = getattr(engine.pipes[v.name], "load_parts_s", {})
    stamps["read_ahead"] = getattr(engine.pipes[v.name], "read_ahead", {})
    stamps["perf_info"] = {k: val for k, val in getattr(engine.pipes[v.name], "perf_info", {}).items()
                           if k != "step_cache"}
    stamps["inductor_counters"] = {k: val for k, val in counters["inductor"].items() if "cache" in k}
    print("STAMPS " + json.dumps({**stamps, "perf": engine.perf, "peak_gib": peak}), flush=True)


def unlocked_packages(lock: Path) -> dict:
    """The top-level modules of the installed distributions that `lock` does not name (a folder such
    as nvidia/ that a locked distribution shares stays visible), and how the host differs from it.
    What the host's versions of locked distributions require stays visible too: the image's versions
    have their own equivalents (the host's huggingface_hub may need httpx where the lock has httpx2)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as canonical

    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line[:1].isspace() and not line.startswith("#"):
            name, version = line.split(";")[0].split("==")
            pins[canonical(name.split("[")[0])] = version.strip(" \\")
    dists: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        dists.setdefault(canonical(dist.metadata["Name"]), dist)  # the first on sys.path is the one imports find
    keep, queue = set(pins) & set(dists), list(set(pins) & set(dists))
    while queue:
        for text in dists[queue.pop()].requires or []:
            req = Requirement(text)
            name = canonical(req.name)
            if name in dists and name not in keep and (req.marker is None or req.marker.evaluate({"extra": ""})):
                keep.add(name)
                queue.append(name)
    tops: dict[bool, set[str]] = {True: {"fluxstack"}, False: set()}  # the image installs fluxstack too
    for name, dist in dists.items():
        for f in dist.files or []:
            top = f.parts[0].split(".")[0] if len(f.parts) == 1 else f.parts[0]  # a module file, or a folder
            if top not in ("..", "__pycache__") and not top.endswith((".dist-info", ".data", ".pth")):
                tops[name in keep].add(top)
    return {"hidden": sorted(tops[False] - tops[True]),
            "hidden_distributions": sorted(set(dists) - keep),
            "kept_for_host_versions": sorted(keep - set(pins)),
            "locked_not_installed": sorted(set(pins) - set(dists)),
            "other_versions": {n: f"{dists[n].version} (lock {v})" for n, v in sorted(pins.items())
                               if n in dists and dists[n].version.split("+")[0] != v}}


def hide(modules: set[str], distributions: set[str]) -> None:
    """Make imports and importlib.util.find_spec miss these top-level modules, and importlib.metadata
    these distributions, as in an image without them. diffusers and transformers probe optional
    packages both ways, and reading every installed distribution's file list
    (importlib.metadata.packages_distributions) takes time in proportion to how many there are."""
    import importlib.machinery

    from packaging.utils import canonicalize_name

    class LockedPathFinder(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
            return None if fullname.split(".")[0] in modules else super().find_spec(fullname, path, target)

        @classmethod
        def find_distributions(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
            return (d for d in super().find_distributions(*args, **kwargs)
                    if canonicalize_name(d.metadata["Name"] or "") not in distributions)

    sys.meta_path[:] = [LockedPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


def compile_bytecode(prefix: Path) -> None:
    import diffusers
    import torch
    import transformers

    dirs = sorted({str(Path(m.__file__).parents[1]) for m in (torch, diffusers, transformers)}
                  | {str(Path(__file__).resolve().parents[2] / "src")})
    # Some packages ship files Python cannot compile (templates, tests for other versions): not an error here.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs], capture_output=True,
                   env=dict(os.environ, PYTHONPYCACHEPREFIX=str(prefix)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/fluxbench"))
    parser.add_argument("--perf", default="fp8")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--label", default="", help="suffix of the result key, for variants of one setting")
    parser.add_argument("--child-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the runtime processes (e.g. TORCHINDUCTOR_COMPILE_THREADS=1)")
    parser.add_argument("--no-prepared-weights", action="store_true")
    parser.add_argument("--read-threads", type=int, default=4, help="the runtime's --read-threads")
    parser.add_argument("--setting", action="append", default=[], metavar="LABEL=ARGS",
                        help="compare settings side by side: every run starts one process per setting, in turn, "
                        "with ARGS added to its command line (e.g. 'serial=--read-threads 0')")
    parser.add_argument("--bytecode", type=Path, metavar="DIR",
                        help="compile the packages to bytecode under DIR first and start the processes with it")
    parser.add_argument("--only-locked", type=Path, metavar="LOCK",
                        help="hide the installed distributions LOCK does not name (requirements/runtime.lock)")
    parser.add_argument("--hide", type=Path, help=argparse.SUPPRESS)  # what the child hides
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from runtime_bench import make_store

    make_store(args.work, schnell=False)  # untimed: the weights on disk and in the page cache
    results: dict = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    key = f"cold_start_{args.perf}_{args.profile}{args.label}"
    env = dict(os.environ) | dict(item.split("=", 1) for item in args.child_env)
    if args.bytecode:
        env["PYTHONPYCACHEPREFIX"] = str(args.bytecode)
        compile_bytecode(args.bytecode)
    hidden: list[str] = []
    if args.only_locked:
        packages = unlocked_packages(args.only_locked)
        results[f"{key}_packages"] = packages
        (args.work / "hidden.json").write_text(json.dumps(packages))
        hidden = ["--hide", str(args.work / "hidden.json")]
    results[key] = []
    settings = [s.split("=", 1) for s in args.setting] or [["", ""]]
    own = ["--read-threads", str(args.read_threads)]
    for i, (label, extra) in ((i, s) for i in range(args.runs) for s in settings):
        cache = "warm" if args.cache.is_dir() and any(args.cache.iterdir()) else "empty"
        start = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", "--work", str(args.work), "--perf", args.perf,
                               "--profile", args.profile, "--cache", str(args.cache), *hidden, *own, *extra.split()]
                              + (["--no-prepared-weights"] if args.no_prepared_weights else []),
                              capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("STAMPS ")), None)
        if line is None:
            results[key].append({"run": i, "setting": label, "error": proc.stderr[-3000:]})
        else:
            s = json.loads(line[7:])
            results[key].append({"run": i, "setting": label, "args": extra, "cache": cache, "perf": s["perf"],
                                 "child_env": args.child_env,
                                 "imports_s": s["imported"] - start, "ready_s": s["ready"] - start,
                                 "first_image_s": s["first_image"] - start,
                                 "first_request_s": s["first_image"] - s["ready"],
                                 "steady_request_s": s["second_image_s"], "peak_gib": s["peak_gib"],
                                 "store_checked_s": s["store_checked"] - start, "engine": s["engine_timings"],
                                 "load_parts_s": s["load_parts_s"], "read_ahead": s["read_ahead"],
                                 "perf_info": s["perf_info"], "inductor_cache": s["inductor_counters"]})
        print(json.dumps(results[key][-1])[:3000], flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
