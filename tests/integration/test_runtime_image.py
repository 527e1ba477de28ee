"""The runtime's container image, built from this checkout with the real Docker engine, run on CPU
with the seeded tiny model mounted read-only: health, readiness, a generation, non-root, HEALTHCHECK."""

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

from helpers import REPO

DOCKER = os.environ.get("DOCKER", "docker")
TAG = "fluxstack/runtime:test"


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which(DOCKER) is None or docker("info", check=False).returncode != 0:
        pytest.skip("no running Docker engine (.ci/run installs and starts one; locally: start dockerd)")
    build = subprocess.run(["make", "image-runtime", f"RUNTIME_IMAGE={TAG}", f"DOCKER={DOCKER}"], cwd=REPO,
                           capture_output=True, text=True, timeout=3000)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return TAG


@pytest.fixture(scope="module")
def container(image: str, seeded: tuple[Path, Path]) -> Iterator[str]:
    store, manifest = seeded
    run = docker("run", "-d", "-p", "127.0.0.1::8000", "-v", f"{store}:/models:ro",
                 "-v", f"{manifest.parent}:/manifests:ro", image,
                 "runtime", "serve", "--host", "0.0.0.0", "--manifest", f"/manifests/{manifest.name}",
                 "--profile", "cpu")
    cid = run.stdout.strip()
    yield cid
    docker("rm", "-f", cid, check=False)


def url_of(cid: str) -> str:
    return "http://" + docker("port", cid, "8000/tcp").stdout.split()[0]


def wait_ready(url: str, cid: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1)
    raise AssertionError("not ready:\n" + docker("logs", cid, check=False).stdout[-3000:])


def test_image_serves_health_and_a_generation_as_non_root(container: str) -> None:
    url = url_of(container)
    wait_ready(url, container)
    with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    body = json.dumps({"prompt": "a cat holding a sign", "seed": 3, "response_format": "png"}).encode()
    request = urllib.request.Request(f"{url}/v1/images/generations", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        png = response.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert docker("exec", container, "id", "-u").stdout.strip() == "10001"
    touch = docker("exec", container, "touch", "/models/x", check=False)
    assert touch.returncode != 0 and "Read-only" in touch.stderr
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline and status != "healthy":
        status = docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()
        time.sleep(2)
    assert status == "healthy"


def test_image_refuses_to_start_without_a_seeded_store(image: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    run = docker("run", "--rm", "-v", f"{empty}:/models:ro", image, "runtime", "serve", "--manifest",
                 "flux-dev-runtime", "--profile", "cpu", check=False)
    assert run.returncode == 2
    assert "flux-dev-runtime" in run.stderr and "fluxstack manifest lock" in run.stderr


# A module of the kind Triton's launcher is: C against Python's and CUDA's headers, built by Triton's
# own build function. Only a GPU host has the driver's libcuda, so this one does not link it.
LAUNCHER_PROBE = r'''
import os
import triton
from triton.runtime.build import compile_module_from_src

src = ('#include <Python.h>\n#include "cuda.h"\n'
       'static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "launcher_probe", NULL, -1, NULL};\n'
       'PyMODINIT_FUNC PyInit_launcher_probe(void) { return PyModule_Create(&m); }\n')
include = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include")
print("loaded", compile_module_from_src(src, "launcher_probe", include_dirs=[include]).__name__)
'''


def test_image_can_build_what_triton_builds_on_its_first_gpu_run(image: str) -> None:
    """Every performance mode but `exact` runs torch.compile, and on a GPU Triton first compiles its
    kernel launcher with the image's C compiler; an image without one fails at warm-up with "Failed
    to find C compiler". No GPU here: build and load a module of the same kind, as the service user."""
    run = docker("run", "--rm", "--entrypoint", "python3", image, "-c", LAUNCHER_PROBE, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "loaded launcher_probe" in run.stdout
