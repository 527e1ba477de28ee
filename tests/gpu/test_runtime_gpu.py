"""The runtime service on a real GPU, with full-size FLUX.1-dev-shaped random weights seeded into a store.

Runs only where CUDA is available (the H100 of the device tool); CI has no GPU and skips it.
Checks what a CPU cannot: the auto profile, GPU memory in /metrics, and that a CUDA
out-of-memory error answers 503, frees memory, and the next request succeeds.
"""

import hashlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")]
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "gpu"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(64 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from runtime_bench import make_store

    root = tmp_path_factory.mktemp("gpu-store")
    paths = make_store(root, schnell=False)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(sha256, files))
    entries = [{"repo": "bench/flux-dev-random", "revision": "main", "path": str(p.relative_to(root)),
                "dest": str(p.relative_to(root)), "size": p.stat().st_size, "sha256": d, "gated": False,
                "license": "apache-2.0"} for p, d in zip(files, digests, strict=True)]
    rel = {role: str(paths[role].relative_to(root)) for role in paths}
    manifest = root.parent / "flux-dev-random.yaml"
    manifest.write_text(yaml.safe_dump({
        "name": "flux-dev-random", "description": "full-size random FLUX.1-dev shapes", "files": entries,
        "runtime": {"variant": "flux-dev", "task": "text-to-image", **rel,
                    "defaults": {"steps": 4, "guidance": 3.5, "max_sequence_length": 512}}}, sort_keys=False))
    seed = subprocess.run([sys.executable, "-m", "fluxstack", "seed", str(manifest), "--models-dir", str(root),
                           "--endpoint", "http://127.0.0.1:9", "--space-margin", "0"], capture_output=True, text=True,
                          cwd=REPO)
    assert seed.returncode == 0, seed.stderr  # every file present: hashed and marked ready, nothing fetched
    return root, manifest


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/v1/images/generations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def serve(root: Path, manifest: Path, port: int, *args: str) -> tuple[subprocess.Popen[str], str, dict]:
    """Start `fluxstack runtime serve` and wait (up to 300 s) until /readyz says ready."""
    proc = subprocess.Popen([sys.executable, "-m", "fluxstack", "runtime", "serve", "--models-dir", str(root),
                             "--manifest", str(manifest), "--port", str(port), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout or []), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    ready: dict = {}
    try:
        while time.monotonic() < deadline and not ready.get("ready"):
            assert proc.poll() is None, "runtime exited:\n" + "".join(log)[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                    ready = json.loads(response.read())
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        assert ready.get("ready"), "".join(log)[-3000:]
    except BaseException:
        proc.terminate()
        raise
    return proc, url, ready


def test_oom_answers_503_frees_memory_and_the_next_request_runs(store: tuple[Path, Path]) -> None:
    root, manifest = store
    # --perf exact: the memory-profile behaviour this test was written for
    proc, url, ready = serve(root, manifest, 18000, "--gpu-memory-limit", "36GiB", "--perf", "exact")
    try:
        assert ready["profile"] == "full" and ready["device"] == "cuda"  # 36 GiB cap: bf16 fits, fp8 not needed

        assert post(url, {"prompt": "a cat", "seed": 1})[0] == 200
        status, body = post(url, {"prompt": "a cat", "seed": 1, "n": 4, "width": 2048, "height": 2048})
        assert status == 503, body
        assert "out of memory" in body["error"] and "memory was freed" in body["error"]
        assert post(url, {"prompt": "a cat", "seed": 2})[0] == 200
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        peak = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("fluxstack_gpu_memory_peak_bytes"))
        assert 20 * 2**30 < peak <= 36 * 2**30
        print(json.dumps({"ready": ready, "peak_gib": peak / 2**30}))
    finally:
        proc.terminate()
        proc.wait(30)


def test_default_performance_mode_compiles_at_start_and_serves(store: tuple[Path, Path], tmp_path: Path) -> None:
    from fluxstack.runtime.perf import AUTO_ORDER

    root, manifest = store
    cache = tmp_path / "compile-cache"
    proc, url, ready = serve(root, manifest, 18001, "--compile-cache", str(cache))
    try:
        # an H100 runs fp8, so auto is the first mode of its preference; compiled kernels went to the cache
        assert ready["perf"] == AUTO_ORDER[0] and ready["perf_why"].startswith("auto"), ready
        assert any((cache / "inductor").rglob("*")), "nothing was written to the compile cache"
        status, body = post(url, {"prompt": "a cat", "seed": 1})
        assert status == 200, body
        import base64
        import io

        from PIL import Image

        png = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
        assert json.loads(png.text["fluxstack"])["perf"] == AUTO_ORDER[0]
        print(json.dumps({"ready": ready}))
    finally:
        proc.terminate()
        proc.wait(30)
