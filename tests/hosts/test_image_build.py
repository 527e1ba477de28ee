"""`fluxstack_image_source: build` for real: `make deploy` packs this checkout, puts it on a systemd
test host (fxs-host-build, its own Docker installed by the docker role) and builds the missing
gateway image there with BuildKit, from Debian's packages and npm (through this machine's CA bundle,
handed to the build as a secret when there is one). The base image comes from a `docker save`
tarball named in fluxstack_image_tarballs, as on an air-gapped site.

The 5.5 GB runtime image is streamed into the host beforehand: building it here would take too long,
and it shows that only the missing images are built. The host runs the gateway only (no seeding, no
runtime), enough to see the built image serve.

The tests in this module run in order against the one host."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest
from hostlab import IMAGE, REPO, ensure_runtime_image, recap, skip_without_engine

HOST = "fxs-host-build"
BASE = "debian:trixie-slim"  # FROM of docker/gateway/Dockerfile (the host has no registry to pull it from)
GATEWAY = "fluxstack/gateway:fxs-build"
GATEWAY_TOKEN = "fxsBUILDgatewayTOKEN0123456789abcdef"
HOST_CA = "/usr/local/share/fxs-build-ca.crt"
# Behind a TLS-intercepting proxy, npm is reachable only with this machine's bundle (as for `make image-*`).
CA_BUNDLE = os.environ.get("CA_BUNDLE") or "/etc/ssl/certs/ca-certificates.crt"


def deploy(inventory: Path, ansible_args: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", "deploy", f"HOST={HOST}", f"INVENTORY={inventory}",
                           f"ANSIBLE_ARGS={ansible_args}"], cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"})


def failed_build_deploy(inventory: Path, tag: str, extra: str) -> str:
    """Deploy only the stack with the gateway under a new tag (so the role must build it) and `extra`
    variables; assert it failed, leaving no image under that tag; return its output on one line."""
    done = deploy(inventory, f"--tags flux_stack -e fluxstack_gateway_image={GATEWAY}-{tag} {extra}")
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0, out[-4000:]
    assert on_host(f"docker image ls -q {GATEWAY}-{tag}") == ""
    return out


def on_host(command: str) -> str:
    return harness.docker("exec", HOST, "sh", "-c", command, timeout=600)


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    skip_without_engine()
    # The host's own copy of the runtime image, plus docker load's unpacking space.
    free = shutil.disk_usage("/var/lib/docker" if os.path.exists("/var/lib/docker") else "/").free
    if free < 12 << 30:
        pytest.skip(f"streaming the 5.5 GB runtime image into {HOST} needs ~12 GiB free; {free >> 30} GiB free")
    ensure_runtime_image()
    harness.build_image("trixie")  # also makes the local debian:trixie-slim when it is missing
    harness.network()
    images = harness.STATE / "build-images"
    images.mkdir(parents=True, exist_ok=True)
    harness.docker("save", "-o", str(images / "base.tar"), BASE)
    harness.remove_hosts([HOST])  # a host left by an earlier run would already hold the images
    ip = harness.start_host(HOST, "trixie", [f"{images}:/srv/fxs-build:ro"])
    settings: dict = {
        "preflight_min_ram_gb": 1, "preflight_min_free_disk_gb": 2, "preflight_disk_margin_gb": 1,
        "preflight_require_gpu": False, "docker_apt_cache_valid_time": 10 ** 8,
        "fluxstack_services": [], "fluxstack_seed": False, "fluxstack_gateway": True,
        "fluxstack_gateway_tokens": [GATEWAY_TOKEN], "fluxstack_gateway_image": GATEWAY, "fluxstack_image": IMAGE,
        "fluxstack_image_source": "build", "fluxstack_image_tarballs": {BASE: "/srv/fxs-build/base.tar"},
    }
    if Path(CA_BUNDLE).is_file():
        harness.docker("cp", CA_BUNDLE, f"{HOST}:{HOST_CA}")
        # Given through a link, as distributions' bundles often are.
        harness.docker("exec", HOST, "ln", "-sf", HOST_CA, "/etc/fxs-build-ca.pem")
        settings["fluxstack_build_ca_bundle"] = "/etc/fxs-build-ca.pem"
    path = harness.inventory({HOST: ip}, tmp_path_factory.mktemp("build") / "inventory" / "hosts.yml", settings)
    try:
        done = deploy(path, "--tags preflight,docker")
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        # The runtime image as a `docker save | docker load` stream: no 5.5 GB file on this machine's disk.
        with subprocess.Popen([harness.DOCKER, "save", IMAGE], stdout=subprocess.PIPE) as save:
            subprocess.run([harness.DOCKER, "exec", "-i", HOST, "docker", "load"], stdin=save.stdout, check=True,
                           capture_output=True, timeout=1800)
        yield path
    finally:
        if not os.environ.get("FXS_HOST_KEEP"):
            harness.remove_hosts([HOST])
            shutil.rmtree(images, ignore_errors=True)


def image_id(name: str) -> str:
    return on_host(f"docker image inspect -f '{{{{.Id}}}}' {name}")


def test_deploy_builds_the_missing_gateway_from_the_checkout_and_serves_it(inventory: Path) -> None:
    runtime_before = image_id(IMAGE)
    done = deploy(inventory)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert recap(out)[HOST]["changed"] > 0
    # Built on the host from the archive the role copied there (its sha1 labels the image).
    archive = on_host("sha1sum /opt/fluxstack/build/context.tar.gz").split()[0]
    label = on_host(f"docker image inspect -f '{{{{index .Config.Labels \"org.fluxstack.build-context-sha1\"}}}}' "
                    f"{GATEWAY}")
    assert label == archive
    assert on_host("test -f /opt/fluxstack/build/context/docker/gateway/Dockerfile && echo yes") == "yes"
    # The base came from its tarball; the runtime, already there, was not rebuilt.
    assert "Load missing base images from their tarballs" in out and f"changed: [{HOST}] => (item={BASE})" in out
    assert image_id(IMAGE) == runtime_before
    # The CA bundle reached the build as a secret only: no file of the image is the bundle.
    if Path(CA_BUNDLE).is_file():
        size = on_host(f"stat -c %s {HOST_CA}")
        digest = on_host(f"sha256sum {HOST_CA}").split()[0]
        found = on_host(f"docker run --rm --user 0 --entrypoint sh {GATEWAY} -c "
                        f"'find / -xdev -type f -size {size}c -exec sha256sum {{}} + 2>/dev/null; true'")
        assert digest not in found
    # The built gateway serves: /healthz is open, the API wants the token.
    url = "https://127.0.0.1:8443"
    assert on_host(f"curl -sk -o /dev/null -w '%{{http_code}}' {url}/healthz") == "200"
    assert on_host(f"curl -sk -o /dev/null -w '%{{http_code}}' {url}/v1/models") == "401"


def test_a_second_deploy_builds_nothing(inventory: Path) -> None:
    gateway_before = image_id(GATEWAY)
    done = deploy(inventory)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert recap(out)[HOST]["changed"] == 0, out[-6000:]
    assert "Build the missing images" not in out
    assert image_id(GATEWAY) == gateway_before


def test_a_base_image_neither_present_nor_pullable_is_explained(inventory: Path) -> None:
    base = "registry.invalid/debian:trixie-slim"
    out = failed_build_deploy(inventory, "nobase", f"-e fluxstack_build_base_image={base}")
    assert f"The build base image {base} is not on {HOST} and could not be pulled" in out, out[-4000:]
    assert f"docker save -o base.tar {base}" in out and "fluxstack_image_tarballs" in out
    assert "set fluxstack_build_base_image to a copy in a registry the host reaches" in out


def test_a_failed_build_names_the_sources_to_check(inventory: Path) -> None:
    # An extra --build-arg (fluxstack_build_args) pointing npm at a registry that does not exist.
    extra = '{"fluxstack_build_args": {"NPM_REGISTRY": "https://registry.invalid"}}'
    out = failed_build_deploy(inventory, "nonpm", f"-e '{extra}'")
    assert f"Building gateway on {HOST} failed (docker compose build exited" in out, out[-4000:]
    assert "registry.invalid" in out  # the build's own last lines say what it could not reach
    assert "set fluxstack_build_pip_index_url, fluxstack_build_npm_registry or fluxstack_build_comfyui_git_url" in out


def test_a_ca_bundle_missing_on_the_host_is_explained(inventory: Path) -> None:
    missing = "/etc/ssl/no-such-bundle.pem"
    out = failed_build_deploy(inventory, "noca", f"-e fluxstack_build_ca_bundle={missing}")
    assert f"fluxstack_build_ca_bundle is {missing}, which is not a file on {HOST}" in out, out[-4000:]
