"""The diffusers runtime on CPU with the tiny model, through the real path and a real HTTP server:
tiny model -> mirror -> seeder -> store -> `fluxstack runtime serve` -> HTTP."""

import base64
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from helpers import REPO, cli_env, fluxstack, free_port

pytest.importorskip("diffusers", reason="the runtime extra is not installed (pip install -e .[runtime])")


@dataclass
class Runtime:
    url: str
    store: Path
    manifest: Path
    proc: subprocess.Popen[str]
    log: list[str]




def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"{url}/v1/images/generations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def start_runtime(store: Path, manifest: Path, *extra: str) -> Runtime:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluxstack", "runtime", "serve", "--models-dir", str(store), "--manifest",
         str(manifest), "--profile", "cpu", "--port", str(port), *extra],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout or []), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("runtime exited:\n" + "".join(log))
        try:
            if get(f"{url}/readyz")[0] == 200:
                return Runtime(url, store, manifest, proc, log)
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("runtime not ready in time:\n" + "".join(log))


@pytest.fixture(scope="module")
def runtime(seeded: tuple[Path, Path]) -> Iterator[Runtime]:
    store, manifest = seeded
    rt = start_runtime(store, manifest, "--queue-size", "1", "--max-pixels", str(256 * 256), "--manifest",
                       str(manifest.with_name("tiny-flux-kontext.yaml")))
    yield rt
    rt.proc.terminate()
    rt.proc.wait(20)


def generate_png(rt: Runtime, **body: object) -> bytes:
    status, headers, data = post(rt.url, {"prompt": "a cat holding a sign that says hello world",
                                          "response_format": "png", **body})
    assert status == 200, data
    assert headers["content-type"] == "image/png"
    return data


def test_generation_returns_a_png_of_the_requested_size_that_says_how_it_was_made(runtime: Runtime) -> None:
    png = generate_png(runtime, width=96, height=64, seed=7, steps=3)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (96, 64)
    assert len(image.getcolors(maxcolors=1 << 16) or []) > 10  # a picture of random weights, not NaN-black
    meta = json.loads(image.text["fluxstack"])
    assert meta["prompt"] == "a cat holding a sign that says hello world"
    assert (meta["seed"], meta["steps"], meta["model"], meta["manifest"]) == (7, 3, "tiny-flux", "tiny-flux")
    manifest = {f["dest"]: f["sha256"] for f in
                json.loads((runtime.store / ".fluxstack" / "ready-tiny-flux.json").read_text())["files"]}
    assert meta["sha256"]["transformer"] == manifest["diffusion_models/flux1-tiny.safetensors"]
    assert meta["sha256"]["t5"] == manifest["text_encoders/t5xxl-tiny.safetensors"]


def test_same_seed_same_bytes_other_seed_other_bytes(runtime: Runtime) -> None:
    first = generate_png(runtime, seed=1234)
    assert generate_png(runtime, seed=1234) == first
    assert generate_png(runtime, seed=1235) != first


def test_a_lora_changes_the_output_and_is_recorded(runtime: Runtime) -> None:
    plain = generate_png(runtime, seed=5)
    styled = generate_png(runtime, seed=5, loras=[{"name": "tiny-style", "weight": 1.0}])
    assert styled != plain
    assert json.loads(Image.open(io.BytesIO(styled)).text["fluxstack"])["loras"] == [
        {"name": "tiny-style", "weight": 1.0}]
    assert generate_png(runtime, seed=5) == plain  # LoRAs do not leak into the next request


def test_json_response_with_several_images(runtime: Runtime) -> None:
    status, _, data = post(runtime.url, {"prompt": "two", "n": 2, "seed": 3})
    assert status == 200
    body = json.loads(data)
    assert body["seed"] == 3 and len(body["data"]) == 2
    images = [base64.b64decode(item["b64_json"]) for item in body["data"]]
    assert images[0] != images[1]


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"width": 100}, "width", "multiple of 16"),
    ({"height": 8}, "height", "16..4096"),
    ({"width": 512, "height": 512}, "width", "more than the 65536"),
    ({"steps": 0}, "steps", "1..100"),
    ({"steps": 101}, "steps", "1..100"),
    ({"prompt": ""}, "prompt", "characters"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": "x" * 2001}, "prompt", "2000"),
    ({"loras": [{"name": "nope"}]}, "loras", "tiny-style"),
    ({"model": "flux-ultra"}, "model", "tiny-flux"),
    ({"image": base64.b64encode(b"not an image").decode()}, "image", "text-to-image"),
    ({"n": 2, "response_format": "png"}, "response_format", "b64_json"),
    ({"guidance": -1}, "guidance", "0..30"),
    ({"colour": "red"}, "colour", "Extra inputs"),
])
def test_bad_input_is_422_naming_the_field(runtime: Runtime, body: dict, field: str, words: str) -> None:
    status, _, data = post(runtime.url, {"prompt": "ok", **body})
    assert status == 422, data
    answer = json.loads(data)
    assert any(e["field"] == field for e in answer["errors"]), answer
    assert words in answer["error"]


def test_a_full_queue_answers_429_with_retry_after(runtime: Runtime) -> None:
    results: list[tuple[int, dict[str, str]]] = []

    def slow() -> None:
        status, headers, _ = post(runtime.url, {"prompt": "busy", "width": 256, "height": 256, "steps": 100,
                                                "n": 2, "seed": 1})
        results.append((status, headers))

    threads = [threading.Thread(target=slow) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    statuses = sorted(s for s, _ in results)
    assert 200 in statuses and 429 in statuses, statuses
    assert all(int(h["retry-after"]) >= 1 for s, h in results if s == 429)


def test_health_models_metrics_and_docs(runtime: Runtime) -> None:
    assert json.loads(get(f"{runtime.url}/healthz")[1]) == {"status": "ok"}
    ready = json.loads(get(f"{runtime.url}/readyz")[1])
    assert ready["ready"] and ready["profile"] == "cpu"
    # where the start went, per variant (docs/performance.md "Cold start")
    assert {"imports", "transformer", "t5", "placement"} <= set(ready["startup"]["tiny-flux_load_parts_s"])
    assert ready["startup"]["tiny-flux_load_s"] >= sum(ready["startup"]["tiny-flux_load_parts_s"].values()) - 0.5
    assert [(v["name"], v["task"]) for v in ready["variants"]] == [("tiny-flux", "text-to-image"),
                                                                    ("tiny-flux-kontext", "image-edit")]
    models = json.loads(get(f"{runtime.url}/v1/models")[1])
    assert [m["id"] for m in models["data"]] == ["tiny-flux", "tiny-flux-kontext"]
    assert models["loras"] == ["tiny-style"]
    generate_png(runtime, seed=9)
    metrics = get(f"{runtime.url}/metrics")[1].decode()
    assert 'fluxstack_requests_total{route="/v1/images/generations",status="200"}' in metrics
    assert "fluxstack_images_generated_total" in metrics and "fluxstack_queue_depth" in metrics
    assert get(f"{runtime.url}/docs")[0] == 200
    assert "/v1/images/generations" in json.loads(get(f"{runtime.url}/openapi.json")[1])["paths"]


def test_the_generate_command_writes_the_image(runtime: Runtime, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    proc = fluxstack("generate", "A cat holding a sign that says hello world", "--out", out, "--url", runtime.url,
                     "--seed", "42", "--steps", "2", "--lora", "tiny-style:0.5")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64) and "seed 42" in proc.stderr
    bad = fluxstack("generate", "x", "--out", out, "--url", runtime.url, "--width", "99")
    assert bad.returncode == 2 and "multiple of 16" in bad.stderr


def test_readyz_reports_a_file_that_disappeared(runtime: Runtime) -> None:
    vae = runtime.store / "vae" / "ae-tiny.safetensors"
    moved = vae.with_suffix(".moved")
    vae.rename(moved)
    try:
        status, data = get(f"{runtime.url}/readyz")
        assert status == 503 and "missing vae/ae-tiny.safetensors" in json.loads(data)["missing"]
    finally:
        moved.rename(vae)
    assert get(f"{runtime.url}/readyz")[0] == 200


def test_refuses_to_start_on_an_unseeded_store(seeded: tuple[Path, Path], tmp_path: Path) -> None:
    _, manifest = seeded
    proc = fluxstack("runtime", "serve", "--models-dir", tmp_path / "empty", "--manifest", manifest, "--profile", "cpu")
    assert proc.returncode == 2
    assert "not ready for tiny-flux" in proc.stderr and "fluxstack seed tiny-flux" in proc.stderr
    assert "missing diffusion_models/flux1-tiny.safetensors" in proc.stderr


def png_b64(size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_kontext_edits_an_input_image_keeping_its_aspect(runtime: Runtime) -> None:
    red = png_b64((96, 64), (200, 10, 10))
    png = generate_png(runtime, model="tiny-flux-kontext", image=red, seed=11)
    assert Image.open(io.BytesIO(png)).size == (80, 48)  # 3:2 at about the default 64x64 area
    blue = generate_png(runtime, model="tiny-flux-kontext", image=png_b64((96, 64), (10, 10, 200)), seed=11)
    assert blue != png  # the input image reaches the model
    sized = generate_png(runtime, model="tiny-flux-kontext", image=red, seed=11, width=64, height=32)
    assert Image.open(io.BytesIO(sized)).size == (64, 32)


@pytest.mark.parametrize(("image", "words"), [(None, "edits an image"), ("bm90IGFuIGltYWdl", "not a decodable"),
                                              ("%%%", "not a decodable")])
def test_kontext_input_image_errors(runtime: Runtime, image: str | None, words: str) -> None:
    body = {"prompt": "make it blue", "model": "tiny-flux-kontext", **({"image": image} if image else {})}
    status, _, data = post(runtime.url, body)
    assert status == 422 and words in json.loads(data)["error"]
