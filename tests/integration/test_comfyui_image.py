"""The ComfyUI image: built with the real Docker engine from a local ComfyUI tree (GitHub is not
reachable here), source verified by content hash, run on CPU over the seeded tiny store.

The image tests need COMFYUI_SRC (a tree of the pinned commit) and skip without it, saying so;
the refusal to build without any reachable source runs everywhere Docker does.
COMFYUI_TREE overrides the pinned tree hash for a tree known to differ (see the README)."""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import COMFYUI_TAG as TAG
from helpers import REPO, make_comfyui_image, needs_comfyui_src

DOCKER = os.environ.get("DOCKER", "docker")
@pytest.fixture(scope="module")
def comfyui(seeded: tuple[Path, Path]) -> Iterator[str]:
    if shutil.which(DOCKER) is None:
        pytest.skip("no Docker engine")
    build = make_comfyui_image()
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    store, _ = seeded
    cid = subprocess.run([DOCKER, "run", "-d", "-p", "127.0.0.1::8188", "-v", f"{store}:/models:ro", TAG],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield cid
    finally:
        subprocess.run([DOCKER, "rm", "-f", cid], capture_output=True)


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@needs_comfyui_src
def test_comfyui_serves_the_store_read_only_as_non_root(comfyui: str) -> None:
    port = subprocess.run([DOCKER, "port", comfyui, "8188/tcp"], capture_output=True, text=True).stdout.split(":")[-1]
    url = f"http://127.0.0.1:{port.strip()}"
    deadline = time.monotonic() + 300
    stats = None
    while time.monotonic() < deadline and stats is None:
        try:
            stats = get_json(f"{url}/api/system_stats")
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(2)
    logs = subprocess.run([DOCKER, "logs", comfyui], capture_output=True, text=True)
    assert stats is not None, logs.stdout[-2000:] + logs.stderr[-2000:]
    assert stats["system"]["comfyui_version"] == "0.8.0"
    assert "flux1-tiny.safetensors" in get_json(f"{url}/api/models/diffusion_models")
    assert {"clip_l-tiny.safetensors", "t5xxl-tiny.safetensors"} <= set(get_json(f"{url}/api/models/text_encoders"))
    assert "ae-tiny.safetensors" in get_json(f"{url}/api/models/vae")
    assert "tiny-style.safetensors" in get_json(f"{url}/api/models/loras")
    user = subprocess.run([DOCKER, "exec", comfyui, "id", "-u"], capture_output=True, text=True).stdout.strip()
    assert user == "10001"
    touch = subprocess.run([DOCKER, "exec", comfyui, "touch", "/models/x"], capture_output=True, text=True)
    assert touch.returncode != 0 and "Read-only" in touch.stderr
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline and status != "healthy":
        status = subprocess.run([DOCKER, "inspect", "-f", "{{.State.Health.Status}}", comfyui],
                                capture_output=True, text=True).stdout.strip()
        time.sleep(2)
    assert status == "healthy"


@needs_comfyui_src
def test_a_source_tree_that_differs_from_the_pin_is_refused() -> None:
    build = make_comfyui_image("COMFYUI_TREE=" + "0" * 40)
    assert build.returncode != 0
    assert "not the pinned " + "0" * 40 in build.stdout + build.stderr


def test_no_source_and_no_reachable_git_fails_clearly() -> None:
    if shutil.which(DOCKER) is None or subprocess.run([DOCKER, "info"], capture_output=True).returncode:
        pytest.skip("no running Docker engine (.ci/run installs and starts one)")
    build = subprocess.run(["make", "image-comfyui", "COMFYUI_SRC=", f"COMFYUI_IMAGE={TAG}-nosrc", f"DOCKER={DOCKER}",
                            "COMFYUI_GIT_URL=http://127.0.0.1:9/ComfyUI.git"], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert build.returncode != 0
    assert "cannot fetch commit 3cd7b32f1b7e7e90395cefe7d9f9b1f89276d8ce" in build.stdout + build.stderr
