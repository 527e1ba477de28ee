"""GPU checks (marked gpu): skipped with the reason on hosts without an NVIDIA GPU."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_gpu(host: Any) -> None:
    if not (host.exists("nvidia-smi") or host.file("/usr/lib/wsl/lib/nvidia-smi").exists):
        pytest.skip("no NVIDIA GPU on this host (no nvidia-smi): GPU checks do not apply")


def loaded_version(host: Any) -> str:
    for path in ("/proc/driver/nvidia/version", "/sys/module/nvidia/version"):
        f = host.file(path)
        if f.exists:
            text = f.content_string
            m = re.search(r"Kernel Module(?: for [a-z0-9_]+)?\s+([0-9][0-9.]+)", text)
            return m.group(1) if m else text.strip()
    # NVML reports the kernel module's version too (sandboxed kernels hide /proc/driver/nvidia).
    out = host.run("nvidia-smi --query-gpu=driver_version --format=csv,noheader --id=0")
    return out.stdout.strip() if out.rc == 0 else ""


def test_nvidia_smi_lists_the_gpus(host: Any) -> None:
    out = host.run("nvidia-smi -L")
    assert out.rc == 0 and "GPU 0" in out.stdout, out.stdout + out.stderr


def test_loaded_driver_is_the_pinned_version(host: Any, pins: dict[str, Any]) -> None:
    if not pins["nvidia_driver_version"]:
        pytest.skip("no nvidia_driver_version pinned in the inventory")
    assert loaded_version(host) == pins["nvidia_driver_version"], "loaded driver differs from the pin: reboot or re-pin"


def test_driver_packages_are_held(host: Any, pins: dict[str, Any]) -> None:
    if str(pins["nvidia_driver_install"]).lower() in ("false", "no"):
        pytest.skip("the driver is not managed here (nvidia_driver_install: false): holds are the owner's business")
    held = host.check_output("dpkg --get-selections | awk '$2 == \"hold\" {print $1}'").split()
    assert any(p.startswith(("nvidia-", "cuda-drivers")) for p in held), f"no NVIDIA driver package is held: {held}"


def test_persistence_mode_is_on(host: Any) -> None:
    out = host.check_output("nvidia-smi --query-gpu=persistence_mode --format=csv,noheader")
    assert set(out.split()) == {"Enabled"}, f"persistence mode: {out!r} (nvidia-smi -pm 1)"


def test_docker_has_the_nvidia_runtime_or_a_cdi_spec(host: Any) -> None:
    daemon = host.file("/etc/docker/daemon.json")
    runtimes = json.loads(daemon.content_string).get("runtimes", {}) if daemon.exists else {}
    cdi = [p for p in ("/etc/cdi/nvidia.yaml", "/var/run/cdi/nvidia.yaml") if host.file(p).exists]
    assert "nvidia" in runtimes or cdi, "no nvidia runtime in daemon.json and no CDI spec in /etc/cdi or /var/run/cdi"


def test_a_container_sees_the_gpu(host: Any, pins: dict[str, Any]) -> None:
    if not host.exists("docker") or host.run("docker info").rc != 0:
        pytest.skip("no Docker engine answering on this host")
    images = [i for i in (pins["fluxstack_image"], "debian:trixie-slim")
              if host.run(f"docker image inspect {i}").rc == 0]
    if not images:
        pytest.skip("no local image to start a test container from (pull or load one)")
    out = host.run(f"docker run --rm --gpus all --entrypoint nvidia-smi {images[0]} -L")
    assert out.rc == 0 and "GPU 0" in out.stdout, out.stdout + out.stderr
