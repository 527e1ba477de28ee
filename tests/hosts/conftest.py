"""The session's lab of test hosts: see hostlab.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness
from hostlab import HOSTS, Lab, ensure_runtime_image, save_tarball, skip_without_engine, stack_settings, start_mirror


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    skip_without_engine()
    state = harness.STATE
    ensure_runtime_image()
    harness.build_image("trixie")
    gateway = harness.network()
    tarball = state / "images" / "runtime.tar"
    save_tarball(tarball)

    work = tmp_path_factory.mktemp("lab")
    mirror, endpoint, manifest = start_mirror(work, gateway)
    settings = stack_settings(endpoint, str(manifest))
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
