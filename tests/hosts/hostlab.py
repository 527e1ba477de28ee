"""The lab the Ansible tests run in (its `lab` fixture is in conftest.py): systemd containers with
sshd on a private network (tests/hosts/harness.py), a `fluxstack mirror serve` of the tiny model they seed from, and the
runtime image as a tarball they load from (the roles' air-gapped mode: 5.5 GB, once per host).

Everything is removed at the end of the session (FXS_HOST_KEEP=1 keeps the hosts for debugging)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import harness

from helpers import free_port

REPO = harness.REPO
IMAGE = os.environ.get("FXS_HOST_RUNTIME_IMAGE", "fluxstack/runtime:dev")
HOSTS = ["fxs-host-1", "fxs-host-2", "fxs-host-3"]
# A token-shaped secret: the tests assert it never shows up in Ansible's output or Docker metadata.
TOKEN = "hf_fxsTESTsecretTOKEN0123456789abcdef"


def skip_without_engine(ssh: bool = True) -> None:
    """Skip the calling fixture's tests where the lab cannot exist: no Docker engine (or no ssh client,
    for tests that reach their hosts over SSH)."""
    if shutil.which(harness.DOCKER) is None or subprocess.run([harness.DOCKER, "info"], capture_output=True).returncode:
        pytest.skip("no Docker engine (.ci/run installs and starts one)")
    if ssh and shutil.which("ssh") is None:
        pytest.skip("no ssh client (apt-get install openssh-client)")


@dataclass
class Lab:
    state: Path
    inventory: Path
    mirror: subprocess.Popen
    tarball: Path
    ips: dict[str, str] = field(default_factory=dict)

    def make(self, target: str, host: str, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
        """Run a real `make <target> HOST=<host>` against the lab's inventory."""
        # --no-print-directory: under `make test` this is a sub-make, whose directory lines would corrupt --json.
        return subprocess.run(["make", "--no-print-directory", target, f"HOST={host}", f"INVENTORY={self.inventory}",
                               *args], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"})

    def sh(self, host: str, command: str, check: bool = True) -> str:
        done = subprocess.run([harness.DOCKER, "exec", host, "sh", "-c", command], capture_output=True, text=True,
                              timeout=600)
        if check and done.returncode:
            raise AssertionError(f"{host}: {command}: {done.stderr}")
        return done.stdout.strip()


def start_mirror(work: Path, address: str) -> tuple[subprocess.Popen, str, Path]:
    """Make the tiny model under `work` and serve it with `fluxstack mirror serve` on `address` (the test
    network's gateway, which the hosts reach): the process, its endpoint URL and the model's manifest."""
    made = subprocess.run([sys.executable, "-m", "fluxstack", "dev", "tiny-model", str(work / "gen")],
                          capture_output=True, text=True, check=True)
    manifest = Path(made.stdout.strip())
    port = free_port()
    mirror = subprocess.Popen([sys.executable, "-m", "fluxstack", "mirror", "serve", "--models-dir",
                               str(work / "gen" / "store"), "--manifest", str(manifest), "--host", address,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://{address}:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{endpoint}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        mirror.kill()
        raise RuntimeError(f"fluxstack mirror serve did not answer on {endpoint}/healthz within 10 s")
    return mirror, endpoint, manifest


def stack_settings(endpoint: str, manifest: str) -> dict:
    """The inventory variables of a deployed test host: the tiny model seeded from `endpoint`, the runtime
    image loaded from /srv/images/runtime.tar, the runtime alone on CPU."""
    return {
        # The test hosts are small, have no GPU and run the runtime only (ComfyUI cannot be built here).
        "preflight_min_ram_gb": 1, "preflight_min_free_disk_gb": 2, "preflight_disk_margin_gb": 1,
        "preflight_require_gpu": False,
        "fluxstack_services": ["runtime"], "fluxstack_manifest": "tiny-flux", "fluxstack_profile": "cpu",
        "fluxstack_space_margin": "0", "fluxstack_hf_endpoint": endpoint,
        "fluxstack_hf_token": TOKEN, "fluxstack_image_source": "load",
        "fluxstack_image_tarballs": {IMAGE: "/srv/images/runtime.tar"}, "fluxstack_image": IMAGE,
        "fluxstack_extra_manifests": [manifest],
        # The docker role installs from the apt cache baked into the test-host image (no network needed).
        "docker_apt_cache_valid_time": 10 ** 8,
    }


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines -> {host: {ok, changed, failed, ...}}."""
    found: dict[str, dict[str, int]] = {}
    for line in output.splitlines():
        if "ok=" in line and "changed=" in line and ":" in line:
            name, _, counts = line.partition(":")
            found[name.strip()] = {k: int(v) for k, v in (kv.split("=") for kv in counts.split())}
    return found


def ensure_runtime_image() -> None:
    if subprocess.run([harness.DOCKER, "image", "inspect", IMAGE], capture_output=True).returncode:
        build = subprocess.run(["make", "image-runtime", f"RUNTIME_IMAGE={IMAGE}", f"DOCKER={harness.DOCKER}"],
                               cwd=REPO, capture_output=True, text=True, timeout=3600)
        assert build.returncode == 0, build.stderr[-3000:]


def save_tarball(path: Path) -> None:
    """docker save the runtime image once (kept while its image id is unchanged)."""
    image_id = subprocess.run([harness.DOCKER, "image", "inspect", "-f", "{{.Id}}", IMAGE], capture_output=True,
                              text=True, check=True).stdout.strip()
    stamp = path.with_suffix(".id")
    if path.exists() and stamp.exists() and stamp.read_text() == image_id:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # 5.5 GB: never two copies at once
    subprocess.run([harness.DOCKER, "save", "-o", f"{path}.part", IMAGE], check=True, timeout=1800)
    os.replace(f"{path}.part", path)
    stamp.write_text(image_id)


def inventory_vars(lab: Lab, host: str) -> dict:
    return yaml.safe_load(lab.inventory.read_text())["all"]["children"]["gpu"]["hosts"][host]
