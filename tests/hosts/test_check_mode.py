"""`--check` of the NVIDIA driver and toolkit roles, forced on as on a GPU host, on a bare test host
of each supported OS (Debian 13 trixie, Debian 12 bookworm, Ubuntu 22.04 jammy, Ubuntu 24.04 noble; the
base images are built here by scripts/build-base-image.sh): the plan runs end to end and changes
nothing. The GPU itself is given as a variable (fluxstack_gpu_present): there is none here.
NVIDIA's repositories are unreachable here, so the plan stops where apt would need them: on a bare
host python3-debian (deb822_repository's library) is missing, and the role reports the
repository and packages as what it would add. Then, on the same host, the docker role for real: the
package names in its vars/ for that OS install a running Docker with compose v2."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import harness
import pytest
from hostlab import recap, skip_without_engine

SUITES = {suite: f"fxs-host-ck-{suite}" for suite in ("trixie", "bookworm", "jammy", "noble")}
# What preflight must detect on each: proof the host really is that OS, and that it counts as supported.
DETECTED = {"trixie": "Debian 13", "bookworm": "Debian 12", "jammy": "Ubuntu 22.04", "noble": "Ubuntu 24.04"}
FORCED = {"fluxstack_gpu_present": True, "nvidia_driver_install": True, "nvidia_container_toolkit_install": True,
          "preflight_mode": "warn"}
LIST_CONFIG = "ls /etc/apt/sources.list.d /etc/apt/apt.conf.d; ls /etc/modprobe.d 2>&1; true"


@pytest.fixture(scope="module", params=sorted(SUITES))
def bare_host(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    skip_without_engine(ssh=False)
    suite = request.param
    name = SUITES[suite]
    harness.build_image(suite)
    harness.network()
    ip = harness.start_host(name, suite)
    inventory = harness.inventory({name: ip}, tmp_path_factory.mktemp(f"ck-{suite}") / "hosts.yml")
    try:
        yield suite, str(inventory)
    finally:
        if not os.environ.get("FXS_HOST_KEEP"):
            harness.remove_hosts([name])


def test_driver_and_toolkit_roles_plan_in_check_mode_and_change_nothing(bare_host: tuple[str, str]) -> None:
    suite, inventory = bare_host
    name = SUITES[suite]
    before = harness.docker("exec", name, "sh", "-c", LIST_CONFIG)
    done = subprocess.run(["make", "check", f"HOST={name}", f"INVENTORY={inventory}",
                           f"ANSIBLE_ARGS=--tags preflight,nvidia -e '{json.dumps(FORCED)}'"],
                          cwd=harness.REPO, capture_output=True, text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0, (out + done.stderr)[-5000:]
    counts = recap(out)[name]
    assert counts["failed"] == 0 and counts["changed"] > 0  # the plan has work in it
    flat = " ".join(out.split())
    for planned in ("Install what deb822_repository needs (python3-debian)",
                    "Keep unattended-upgrades away from the driver", "Blacklist nouveau",
                    "Reboot into the pinned driver"):
        assert f"{planned}] " in flat or planned in flat, planned
    assert "reboot needed: no NVIDIA kernel module is loaded" in flat
    assert f"OS: {DETECTED[suite]}" in flat, flat[:3000]
    warned = flat.partition("WARNING: ")[2].partition("TASK")[0]  # preflight_mode warn: the failed requirements
    assert "OS:" not in warned, warned
    after = harness.docker("exec", name, "sh", "-c", LIST_CONFIG)
    assert before == after  # --check wrote nothing


def test_docker_role_installs_docker_and_compose_v2_from_the_os_packages(bare_host: tuple[str, str]) -> None:
    """For real, after the plan above: the package names in the docker role's vars/ exist on each OS and
    give a running Docker with compose v2 (Debian 12 has no compose v2 package: the role says what to set)."""
    suite, inventory = bare_host
    name = SUITES[suite]
    # The .debs are in the test-host image's apt cache: no apt update, no network.
    done = subprocess.run(["make", "--no-print-directory", "deploy", f"HOST={name}", f"INVENTORY={inventory}",
                           "ANSIBLE_ARGS=--tags docker -e docker_apt_cache_valid_time=100000000"],
                          cwd=harness.REPO, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert harness.docker("exec", name, "systemctl", "is-active", "docker", check=False) == "active", out[-4000:]
    if suite == "bookworm":
        assert done.returncode != 0
        assert "has no compose v2 package with docker_install_method: distro" in " ".join(out.split()), out[-4000:]
        return
    assert done.returncode == 0, out[-4000:]
    assert harness.docker("exec", name, "docker", "compose", "version", "--short").startswith("2.")
