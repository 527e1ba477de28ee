"""Reading a weight file from the page cache onto the GPU on a background thread while the main thread
runs pure Python (the worst case of what the runtime does: it reads while it imports diffusers and
transformers): safetensors' loader against the runtime's reader (runtime/weights_read.py) at several
thread counts, with how much of the interpreter each leaves to the main thread.

    python bench/gpu/read_weights.py --file /tmp/fluxbench/text_encoders/t5xxl_fp16.safetensors --out read.json

Each reader runs --runs times in turn after one untimed read that puts the file in the page cache. "python_share"
is the rate of a pure-Python loop on the main thread while the reader runs, over its rate alone: 1.0 means
the reader never held the GIL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from fluxstack.runtime import weights_read


def python_rate(other: threading.Thread) -> float:
    """Iterations per second of a pure-Python loop on this thread while `other` runs (it sets `done`)."""
    n, t = 0, time.perf_counter()
    other.start()
    while not done.is_set():
        n += 1
    other.join()
    return n / (time.perf_counter() - t)


done = threading.Event()


def timed(read) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(seconds the read took, Python's share of the main thread meanwhile)."""
    torch.cuda.synchronize()
    done.clear()
    spent: list[float] = []

    def run() -> None:
        t = time.perf_counter()
        state = read()
        torch.cuda.synchronize()
        spent.append(time.perf_counter() - t)
        del state
        done.set()

    alone = python_rate(threading.Timer(0.5, done.set))
    done.clear()
    busy = python_rate(threading.Thread(target=run))
    torch.cuda.empty_cache()
    return spent[0], busy / alone


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--threads", default="1,2,4,8")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from safetensors.torch import load_file

    size = args.file.stat().st_size
    load_file(str(args.file))  # into the page cache, untimed
    readers = {"safetensors": lambda: load_file(str(args.file), device="cuda")}
    for n in (int(x) for x in args.threads.split(",")):
        readers[f"threads_{n}"] = lambda n=n: weights_read.read(args.file, "cuda", threads=n)
    runs: dict[str, list] = {name: [] for name in readers}
    result = {"file": str(args.file), "gib": size / 2**30, "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "runs": runs}
    for _ in range(args.runs):
        for name, read in readers.items():
            runs[name].append(timed(read))
            print(name, runs[name][-1], flush=True)
            result["median"] = {name: {"s": statistics.median(s for s, _ in r),
                                       "gb_per_s": size / 1e9 / statistics.median(s for s, _ in r),
                                       "python_share": statistics.median(p for _, p in r)}
                                for name, r in runs.items() if r}
            args.out.write_text(json.dumps(result, indent=1))  # after every run: a time limit keeps what was done
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
