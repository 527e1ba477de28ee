"""Fleet rollouts (ansible/playbooks/rollout.yml) on three real test hosts, canary first.

The "new" image is a re-tag of the deployed one and the "broken" one a tiny layer on top of it
whose HEALTHCHECK always fails, both made inside the hosts' own Docker engines: no extra gigabytes.
fxs-host-1 was deployed by test_deploy.py; this module deploys the other two."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from hostlab import HOSTS, IMAGE, Lab, recap

FLEET = ":".join(HOSTS)
V2, V3 = "fluxstack/runtime:rollout-v2", "fluxstack/runtime:rollout-v3"


def serving(lab: Lab, host: str) -> tuple[str, str]:
    """(image of the running runtime container, its health)."""
    out = lab.sh(host, "docker inspect -f '{{.Config.Image}} {{.State.Health.Status}}' "
                       "$(docker ps -q --filter label=com.docker.compose.service=runtime)")
    image, health = out.split()
    return image, health


@pytest.fixture(scope="module")
def fleet(lab: Lab) -> Lab:
    probe = f"docker image inspect {IMAGE} >/dev/null 2>&1 && echo present"
    missing = [h for h in HOSTS if "present" not in lab.sh(h, probe, check=False)]
    need = (len(missing) * 6 + 6) << 30 if missing else 0  # a copy per host + docker load's unpacking space
    free = shutil.disk_usage("/var/lib/docker" if os.path.exists("/var/lib/docker") else "/").free
    if free < need:
        pytest.skip(f"loading the 5.5 GB image into {len(missing)} more hosts needs ~{need >> 30} GiB free; "
                    f"{free >> 30} GiB free")
    done = lab.make("deploy", FLEET)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    if not os.environ.get("FXS_HOST_KEEP"):
        lab.tarball.unlink(missing_ok=True)  # every host has the image now: give the 5.5 GB back
    for host in HOSTS:
        lab.sh(host, f"docker tag {IMAGE} {V2}")
    # On fxs-host-2 only, v3 is broken: its healthcheck never passes. Elsewhere v3 is good.
    broken = f"FROM {V2}\\nHEALTHCHECK --interval=2s --timeout=2s --start-period=0s --retries=2 CMD [\\\"false\\\"]\\n"
    lab.sh("fxs-host-2", f"printf '{broken}' | docker build -q -t {V3} -")
    for host in ("fxs-host-1", "fxs-host-3"):
        lab.sh(host, f"docker tag {IMAGE} {V3}")
    return lab


def test_a_new_tag_reaches_every_host_canary_first(fleet: Lab) -> None:
    done = fleet.make("rollout", FLEET, f"IMAGE={V2}")
    out = done.stdout
    assert done.returncode == 0, (out + done.stderr)[-6000:]
    assert all(recap(out)[h]["failed"] == 0 for h in HOSTS)
    # serial [1, "25%"]: the canary alone in the first batch, then the others one batch each.
    plays = [m.group(1) for m in re.finditer(r"TASK \[Record the new image and manifest as the last good ones\][^\n]*\n"
                                             r"(?:[^\n]*\n)*?changed: \[([^\]]+)\]", out)]
    assert plays[0] == "fxs-host-1" and sorted(plays) == HOSTS, plays
    for host in HOSTS:
        assert serving(fleet, host) == (V2, "healthy")
        assert fleet.sh(host, "cat /opt/fluxstack/state/last-good-image") == V2
        assert fleet.sh(host, "test -e /opt/fluxstack/state/draining || echo undrained") == "undrained"


def test_a_host_failing_its_health_gate_is_rolled_back_and_the_rollout_stops(fleet: Lab) -> None:
    done = fleet.make("rollout", FLEET, f"IMAGE={V3}")
    out = " ".join(done.stdout.split())
    assert done.returncode != 0
    # The canary took v3; the second host failed its health gate, was rolled back, and the rollout stopped.
    assert "ROLLOUT STOPPED: fxs-host-2 failed the update (deploy and health) gate with " + V3 in out
    assert f"It was rolled back to {V2}" in out
    assert "unhealthy" in out
    counts = recap(done.stdout)
    assert counts["fxs-host-2"]["rescued"] == 1 and counts["fxs-host-2"]["failed"] == 1
    assert "fxs-host-3" not in counts or counts["fxs-host-3"]["changed"] == 0
    assert serving(fleet, "fxs-host-1") == (V3, "healthy")
    assert serving(fleet, "fxs-host-2") == (V2, "healthy")
    assert serving(fleet, "fxs-host-3") == (V2, "healthy")
    assert fleet.sh("fxs-host-2", "cat /opt/fluxstack/state/last-good-image") == V2
    assert fleet.sh("fxs-host-3", "cat /opt/fluxstack/state/last-good-image") == V2
