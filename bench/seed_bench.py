"""Seeder benchmark (not a test): fluxstack seed vs hf_hub_download vs aria2c, side by side in one run.

Everything runs on this machine against `fluxstack mirror serve` on loopback, so the
numbers compare client overhead (hashing included for fluxstack, none for the
others), not networks. Also measured: the no-op re-seed of a flux-dev-sized store
(sparse files) and full-verify throughput against coreutils sha256sum.

    python bench/seed_bench.py [--gib 3] [--out bench/results/seed-<date>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fluxstack.manifest import load_manifest  # noqa: E402
from helpers import Model, cli_env, fluxstack, make_models, start_mirror, write_manifest  # noqa: E402

MiB = 1 << 20

HF_CLIENT = r"""
import sys, time
from huggingface_hub import hf_hub_download
repo_files = [line.split("\t") for line in sys.argv[2:]]
t = time.perf_counter()
for repo, path in repo_files:
    hf_hub_download(repo, path, cache_dir=sys.argv[1])
print(time.perf_counter() - t)
"""


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_downloads(work: Path, models: list[Model], manifest: Path, url: str, rounds: int) -> dict:
    """Each tool downloads the whole set once per round, in rotating order, after a discarded warm-up round.

    'done' stops the clock when the tool exits; 'durable' also includes `sync`, since fluxstack
    fsyncs before it publishes a file and the others leave dirty pages behind.
    """
    total = sum(m.size for m in models)
    env = cli_env(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1")
    listing = work / "aria2.txt"
    listing.write_text("".join(f"{url}/{m.repo}/resolve/main/{m.path}\n  out={m.dest}\n" for m in models))
    tools = {
        "fluxstack seed": lambda out: fluxstack("seed", manifest, "--models-dir", out, "--endpoint", url,
                                                "--space-margin", "0", check=True),
        "hf_hub_download": lambda out: subprocess.run(
            [sys.executable, "-c", HF_CLIENT, str(out), *(f"{m.repo}\t{m.path}" for m in models)],
            env=env, capture_output=True, text=True, check=True),
    }
    if shutil.which("aria2c"):
        tools["aria2c -x8"] = lambda out: subprocess.run(
            ["aria2c", "-x8", "-s8", "-j4", "--file-allocation=falloc", "-q", "-d", str(out), "-i", str(listing)],
            check=True)
    done: dict[str, list[float]] = {name: [] for name in tools}
    durable: dict[str, list[float]] = {name: [] for name in tools}
    names = list(tools)
    for round_no in range(rounds + 1):
        order = names[round_no % len(names):] + names[:round_no % len(names)]
        for name in order:
            out = work / "out"
            drop(out)
            subprocess.run(["sync"], check=True)
            t0 = time.perf_counter()
            tools[name](out)
            t1 = time.perf_counter()
            subprocess.run(["sync"], check=True)
            t2 = time.perf_counter()
            if round_no:  # round 0 warms caches and is discarded
                done[name].append(t1 - t0)
                durable[name].append(t2 - t0)
            drop(out)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return {"bytes": total, "rounds": rounds} | {
        name: {"done_s": sorted(done[name]), "durable_s": sorted(durable[name]),
               "done_mib_s": total / MiB / median(done[name]), "durable_mib_s": total / MiB / median(durable[name])}
        for name in tools}


def bench_noop_reseed(work: Path) -> dict:
    """A store holding sparse files the size of flux-dev's, seeded once (hashing), then re-seeded."""
    real = load_manifest("flux-dev")
    store = work / "flux-dev-store"
    sparse = []
    for i, f in enumerate(real.files):
        path = store / f.dest
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.truncate(f.size or 0)
        sparse.append(Model(f.repo, f.path, f.dest, f.size or 0, "", revision=f.revision))
        sparse[i].sha256 = zero_sha256(f.size or 0)
    manifest = write_manifest(work / "manifests", "flux-dev-sparse", sparse)
    args = ("seed", manifest, "--models-dir", store, "--endpoint", "http://127.0.0.1:9", "--space-margin", "0")
    first = timed(lambda: fluxstack(*args, check=True))
    runs = [timed(lambda: fluxstack(*args, check=True)) for _ in range(5)]
    in_process = []
    for _ in range(5):
        from fluxstack.hub import Source
        from fluxstack.progress import PlainReporter
        from fluxstack.seeder import Seeder, SeedOptions
        from fluxstack.store import Store

        m = load_manifest(str(manifest))
        t = time.perf_counter()
        report = Seeder(m, Store(store), Source("http://127.0.0.1:9", None), SeedOptions(space_margin=0),
                        PlainReporter()).run()
        in_process.append(time.perf_counter() - t)
        assert report.ready and {o.status for o in report.outcomes} == {"cached"}
    total = sum(f.size or 0 for f in real.files)
    drop(store)
    return {"bytes": total, "first_seed_hashing_s": first,
            "noop_reseed_cli_s": sorted(runs)[2], "noop_reseed_in_process_s": sorted(in_process)[2]}


def zero_sha256(size: int) -> str:
    import hashlib

    sha = hashlib.sha256()
    block = bytes(64 * MiB)
    left = size
    while left:
        n = min(left, len(block))
        sha.update(memoryview(block)[:n])
        left -= n
    return sha.hexdigest()


def bench_verify(store: Path, manifest: Path, models: list[Model]) -> dict:
    paths = [str(store / m.dest) for m in models]
    for p in paths:  # warm the page cache so both read from memory
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
    total = sum(m.size for m in models)
    sha256sum = sorted(timed(lambda: subprocess.run(["sha256sum", *paths], capture_output=True, check=True))
                       for _ in range(3))[1]
    verify = sorted(timed(lambda: fluxstack("seed", manifest, "--models-dir", store, "--verify", "--full",
                                            check=True)) for _ in range(3))[1]
    cores = os.cpu_count() or 1
    return {"bytes": total, "sha256sum_s": sha256sum, "sha256sum_mib_s": total / MiB / sha256sum,
            "verify_full_s": verify, "verify_full_mib_s": total / MiB / verify, "cores": cores,
            "verify_per_core_vs_sha256sum": (total / verify / min(cores, len(models))) / (total / sha256sum)}


def machine() -> dict:
    import huggingface_hub

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    aria = subprocess.run(["aria2c", "--version"], capture_output=True, text=True).stdout.split("\n")[0] \
        if shutil.which("aria2c") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") *
            os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "kernel": platform.release(), "python": platform.python_version(),
            "huggingface_hub": huggingface_hub.__version__, "aria2c": aria}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=3.0, help="size of the download file set (default 3 GiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / f"seed-{datetime.now(UTC):%Y%m%d}.json")
    args = parser.parse_args()
    big = int(args.gib * 1024 * MiB * 0.75)
    rest = int(args.gib * 1024 * MiB) - big
    with tempfile.TemporaryDirectory(prefix="fluxstack-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        models = make_models(work / "upstream", [
            ("bench/flux", "transformer.safetensors", "diffusion_models/bench.safetensors", big),
            ("bench/flux", "t5.safetensors", "text_encoders/bench-t5.safetensors", rest * 3 // 4),
            ("bench/flux", "clip.safetensors", "text_encoders/bench-clip.safetensors", rest // 4 - 5 * MiB),
            ("bench/flux", "ae.safetensors", "vae/bench-ae.safetensors", 5 * MiB),
        ])
        manifest = write_manifest(work / "manifests", "bench", models)
        mirror = start_mirror(work / "upstream", "--manifest", manifest)
        try:
            downloads = bench_downloads(work, models, manifest, mirror.url, args.rounds)
        finally:
            mirror.stop()
        verify = bench_verify(work / "upstream", manifest, models)
        noop = bench_noop_reseed(work)
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
              "downloads": downloads, "verify": verify, "noop_reseed": noop}
    tools = [name for name, v in downloads.items() if isinstance(v, dict)]
    result["ratios_vs_hf_hub_download"] = {
        kind: {name: round(downloads[name][f"{kind}_mib_s"] / downloads["hf_hub_download"][f"{kind}_mib_s"], 2)
               for name in tools} for kind in ("done", "durable")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
