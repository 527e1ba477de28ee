"""The compose stack with the real Docker engine and compose plugin, on CPU, offline:
`make up MODEL=flux-dev` falling back, loudly, to the demo where flux-dev cannot run (tiny
model -> mirror service -> seeder service -> runtime service), a generation through the
published port, restart after a crash, and a failed seed keeping the runtime down."""

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import REPO, free_port

DOCKER = os.environ.get("DOCKER", "docker")
DEMO = ["-p", "fluxstack-demo", "--profile", "mirror"]


def compose(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCKER, "compose", *args], cwd=REPO, capture_output=True, text=True, check=check,
                          env={**os.environ, **(env or {})}, timeout=900)




@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which(DOCKER) is None or subprocess.run([DOCKER, "compose", "version"], capture_output=True).returncode:
        pytest.skip("no Docker engine with the compose plugin (.ci/run installs both)")
    port = free_port()
    demo_dir = tmp_path_factory.mktemp("demo")
    # `make up` for flux-dev on a machine without a GPU (or token) must fall back to the demo, loudly.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN_FILE", "DEMO")}
    up = subprocess.run(["make", "up", "MODEL=flux-dev", f"DEMO_DIR={demo_dir}", f"RUNTIME_PORT={port}",
                         f"DOCKER={DOCKER}"], cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "DEMO MODE: no NVIDIA GPU here" in up.stdout or "DEMO MODE: no Hugging Face token" in up.stdout
        assert "TINY RANDOM FLUX-architecture model" in up.stdout
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["make", "demo-down", f"DOCKER={DOCKER}"], cwd=REPO, capture_output=True, timeout=300)


def state(service: str) -> dict:
    cid = compose(*DEMO, "ps", "-a", "-q", service).stdout.strip()
    out = subprocess.run([DOCKER, "inspect", cid], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["State"]


def generate(url: str) -> bytes:
    body = json.dumps({"prompt": "a cat holding a sign", "seed": 5, "response_format": "png"}).encode()
    request = urllib.request.Request(f"{url}/v1/images/generations", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


def test_demo_stack_seeds_from_the_mirror_and_serves(demo: str) -> None:
    seeder = state("seeder")
    assert (seeder["Status"], seeder["ExitCode"]) == ("exited", 0)
    assert state("runtime")["Health"]["Status"] == "healthy"
    logs = compose(*DEMO, "logs", "seeder", "mirror").stdout
    assert "tiny-flux: ready" in logs and "using mirror http://mirror:8090" in logs
    assert '"GET /fluxstack/tiny-flux/resolve/main/' in logs  # the bytes came through the mirror service
    assert generate(demo)[:8] == b"\x89PNG\r\n\x1a\n"
    # The compiled-kernel cache is a volume the (non-root) runtime can write, so restarts reuse it.
    cid = compose(*DEMO, "ps", "-q", "runtime").stdout.strip()
    probe = subprocess.run([DOCKER, "exec", cid, "sh", "-c", 'mkdir -p "$FLUXSTACK_COMPILE_CACHE" && '
                            'touch "$FLUXSTACK_COMPILE_CACHE/probe" && echo "$FLUXSTACK_COMPILE_CACHE"'],
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    mounts = json.loads(subprocess.run([DOCKER, "inspect", "-f", "{{json .Mounts}}", cid], capture_output=True,
                                       text=True, check=True).stdout)
    cache = next(m for m in mounts if probe.stdout.strip().startswith(m["Destination"]))
    assert cache["Type"] == "volume" and cache["RW"]


def test_a_crashed_runtime_is_restarted_and_serves_again(demo: str) -> None:
    before = state("runtime")
    subprocess.run(["kill", "-9", str(before["Pid"])], check=True)  # a crash, not a `docker stop`
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = state("runtime")
        if now["Pid"] not in (0, before["Pid"]) and now.get("Health", {}).get("Status") == "healthy":
            break
        time.sleep(2)
    else:
        raise AssertionError(f"runtime did not come back healthy: {now}")
    assert generate(demo)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_seed_keeps_the_runtime_down_with_the_reason_visible(tmp_path: Path) -> None:
    if shutil.which(DOCKER) is None or subprocess.run([DOCKER, "compose", "version"], capture_output=True).returncode:
        pytest.skip("no Docker engine with the compose plugin (.ci/run installs both)")
    project = ["-p", "fluxstack-failtest"]
    env = {"FLUXSTACK_MANIFEST": "flux-dev-runtime", "RUNTIME_PORT": str(free_port()), "FLUXSTACK_PROFILE": "cpu"}
    try:
        up = compose(*project, "up", "-d", "--wait", "runtime", env=env, check=False)
        assert up.returncode != 0
        assert "seeder" in up.stderr and "exit 2" in up.stderr
        logs = compose(*project, "logs", "seeder", env=env).stdout
        assert "fluxstack manifest lock flux-dev-runtime" in logs
        cid = compose(*project, "ps", "-a", "-q", "runtime", env=env).stdout.strip()
        status = subprocess.run([DOCKER, "inspect", "-f", "{{.State.Status}}", cid], capture_output=True,
                                text=True).stdout.strip()
        assert status == "created"  # never started
    finally:
        compose(*project, "down", "-v", env=env, check=False)


@pytest.mark.parametrize(("override", "env", "expected"), [
    ("compose/gpu.yaml", {"GPU_COUNT": "2"}, {"runtime": {"count": 2}, "comfyui": {"count": 2}}),
    ("compose/gpu-ids.yaml", {"RUNTIME_GPU": "1", "COMFYUI_GPU": "0"},
     {"runtime": {"device_ids": ["1"]}, "comfyui": {"device_ids": ["0"]}}),
])
def test_gpu_overrides_reserve_nvidia_devices(override: str, env: dict[str, str], expected: dict) -> None:
    """What compose hands the engine (the NVIDIA request itself needs a GPU host: tests/host checks it)."""
    if shutil.which(DOCKER) is None or subprocess.run([DOCKER, "compose", "version"], capture_output=True).returncode:
        pytest.skip("no Docker engine with the compose plugin (.ci/run installs both)")
    rendered = json.loads(compose("-f", "compose.yaml", "-f", override, "config", "--format", "json", env=env).stdout)
    for service, fields in expected.items():
        (device,) = rendered["services"][service]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert {k: device.get(k) for k in fields} == fields
    assert "deploy" not in rendered["services"]["seeder"]  # the seeder never holds a GPU
