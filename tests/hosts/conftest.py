"""The session's lab of test hosts: see hostlab.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness
from hostlab import HOSTS, IMAGE, TOKEN, Lab, ensure_runtime_image, save_tarball

from helpers import free_port


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if shutil.which(harness.DOCKER) is None or subprocess.run([harness.DOCKER, "info"], capture_output=True).returncode:
        pytest.skip("no Docker engine (.ci/run installs and starts one)")
    if shutil.which("ssh") is None:
        pytest.skip("no ssh client (apt-get install openssh-client)")
    state = harness.STATE
    ensure_runtime_image()
    harness.build_image("trixie")
    gateway = harness.network()
    tarball = state / "images" / "runtime.tar"
    save_tarball(tarball)

    work = tmp_path_factory.mktemp("lab")
    made = subprocess.run([sys.executable, "-m", "fluxstack", "dev", "tiny-model", str(work / "gen")],
                          capture_output=True, text=True, check=True)
    manifest = Path(made.stdout.strip())
    port = free_port()
    mirror = subprocess.Popen([sys.executable, "-m", "fluxstack", "mirror", "serve", "--models-dir",
                               str(work / "gen" / "store"), "--manifest", str(manifest), "--host", gateway,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://{gateway}:{port}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    settings = {
        # The test hosts are small, have no GPU and run the runtime only (ComfyUI cannot be built here).
        "preflight_min_ram_gb": 1, "preflight_min_free_disk_gb": 2, "preflight_disk_margin_gb": 1,
        "preflight_require_gpu": False,
        "fluxstack_services": ["runtime"], "fluxstack_manifest": "tiny-flux", "fluxstack_profile": "cpu",
        "fluxstack_space_margin": "0", "fluxstack_hf_endpoint": f"http://{gateway}:{port}",
        "fluxstack_hf_token": TOKEN, "fluxstack_image_source": "load",
        "fluxstack_image_tarballs": {IMAGE: "/srv/images/runtime.tar"}, "fluxstack_image": IMAGE,
        "fluxstack_extra_manifests": [str(manifest)],
        # The docker role installs from the apt cache baked into the test-host image (no network needed).
        "docker_apt_cache_valid_time": 10 ** 8,
    }
    ips = {h: harness.start_host(h, "trixie", [f"{tarball.parent}:/srv/images:ro"]) for h in HOSTS}
    inventory = harness.inventory(ips, work / "inventory" / "hosts.yml", settings)
    try:
        yield Lab(state, inventory, mirror, tarball, ips)
    finally:
        mirror.terminate()
        mirror.wait(timeout=10)
        if not os.environ.get("FXS_HOST_KEEP"):
            harness.remove_hosts(HOSTS)
            tarball.unlink(missing_ok=True)
            tarball.with_suffix(".id").unlink(missing_ok=True)
