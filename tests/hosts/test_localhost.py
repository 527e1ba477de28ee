"""`make deploy HOST=localhost` on a real systemd machine: Ansible runs *on* the host it provisions,
over a local connection, as docs/ansible.md says an operator does it on a single GPU box.

The machine is a systemd test host (tests/hosts/harness.py) of Ubuntu 24.04, the OS of a typical
GPU server. This checkout is copied into it (what `git ls-files` lists: the Makefile, ansible/,
compose files, manifests, tests/host), an operator user runs make there with a venv that holds
only the pinned ansible-core, pytest and pytest-testinfra (installed from PyPI on the host), and the
inventory is the example's `localhost` entry (ansible_connection: local) plus the same test settings
as test_deploy.py: the image loaded from a tarball, the tiny model seeded from a `fluxstack mirror
serve`, the runtime alone on CPU. The host has no SSH key for itself: nothing here can go over SSH.

The tests in this module run in order against the one host."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest
import yaml
from hostlab import REPO, ensure_runtime_image, recap, save_tarball, skip_without_engine, stack_settings, start_mirror

HOST = "fxs-host-local"
SUITE = "noble"
CHECKOUT = "/home/fluxops/fluxstack"
VENV = "/opt/fxs-ansible"  # make's VENV: a deploy-only machine needs no torch, only these
PINNED = ("ansible-core", "pytest", "pytest-testinfra")
HOST_CA = "/usr/local/share/fxs-local-ca.crt"  # this machine's CA bundle, for a TLS-intercepting proxy
EXTRA_MANIFEST = "/var/tmp/fxs-local/tiny-flux.yaml"
# Ubuntu 24.04's Docker 29 keeps images in containerd's store by default; unpacking a layer with
# whiteouts there fails inside this nested test host ("failed to convert whiteout file …: operation
# not permitted"), so the inner engine uses the classic overlay2 store (the role's defaults otherwise).
INNER_DAEMON_OPTIONS = {"log-driver": "json-file", "log-opts": {"max-size": "50m", "max-file": "3"},
                        "features": {"containerd-snapshotter": False}}


def on_host(command: str, user: str = "root", timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([harness.DOCKER, "exec", "-u", user, "-w", CHECKOUT if user == "fluxops" else "/",
                           "-e", "ANSIBLE_NOCOLOR=1", "-e", "ANSIBLE_FORCE_COLOR=0", HOST, "sh", "-c", command],
                          capture_output=True, text=True, timeout=timeout)


def run(command: str, user: str = "root", timeout: float = 900) -> str:
    done = on_host(command, user, timeout)
    assert done.returncode == 0, f"{command}: {(done.stdout + done.stderr)[-4000:]}"
    return done.stdout.strip()


def make(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    """What the operator types on the host, in the checkout (the inventory is make's default one)."""
    line = shlex.join(["make", "--no-print-directory", target, "HOST=localhost", f"VENV={VENV}", *args])
    return on_host(line, user="fluxops", timeout=1800)


def pins() -> list[str]:
    wanted = {name.lower() for name in PINNED}
    lines = (REPO / "requirements/dev.txt").read_text().splitlines()
    found = [line.strip() for line in lines if line.partition("==")[0].strip().lower() in wanted]
    assert len(found) == len(PINNED), found
    return found


def copy_checkout() -> None:
    """This checkout as it is (uncommitted changes included), without what git ignores (.venv, caches)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name in listed:
            if name and (REPO / name).is_file():  # listed but deleted in the working tree: not copied
                tar.add(REPO / name, arcname=name)
    run(f"install -d -o fluxops -g fluxops {CHECKOUT}")
    subprocess.run([harness.DOCKER, "exec", "-i", "-u", "fluxops", HOST, "tar", "-C", CHECKOUT, "-x"],
                   input=archive.getvalue(), capture_output=True, timeout=300, check=True)


def local_inventory(settings: dict) -> str:
    """The example inventory's `localhost` (local connection) with the test settings."""
    example = yaml.safe_load((REPO / "ansible/inventory/hosts.example.yml").read_text())
    local = example["all"]["children"]["local"]
    assert local["hosts"]["localhost"]["ansible_connection"] == "local"
    local["hosts"]["localhost"].update(settings)
    return yaml.safe_dump({"all": {"children": {"local": local}}}, sort_keys=False)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    skip_without_engine(ssh=False)
    ensure_runtime_image()
    # The lab's tarball when the deploy tests made it (same path, same image id): saved only once.
    tarball = harness.STATE / "images" / "runtime.tar"
    ours = not tarball.exists()
    need = (12 + (6 if ours else 0)) << 30  # the host's copy + docker load's unpacking space (+ the tarball)
    free = shutil.disk_usage("/var/lib/docker" if os.path.exists("/var/lib/docker") else "/").free
    if free < need:
        pytest.skip(f"a local deploy of the 5.5 GB image needs ~{need >> 30} GiB free; {free >> 30} GiB free")
    save_tarball(tarball)
    harness.build_image(SUITE)
    gateway = harness.network()
    mirror, endpoint, manifest = start_mirror(tmp_path_factory.mktemp("local"), gateway)
    mounts = [f"{tarball.parent}:/srv/images:ro"]
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.exists():
        mounts.append(f"{ca}:{HOST_CA}:ro")
    harness.remove_hosts([HOST])  # a host left by an earlier run would already be deployed
    try:
        harness.start_host(HOST, SUITE, mounts)
        copy_checkout()
        run(f"install -d {Path(EXTRA_MANIFEST).parent}")
        harness.docker("cp", str(manifest), f"{HOST}:{EXTRA_MANIFEST}")
        # make and venv are all the operator adds; the apt lists are the image's (no apt-get update).
        run("apt-get install -y -q --no-install-recommends make python3-venv >/dev/null", timeout=600)
        cert = f"PIP_CERT={HOST_CA} " if ca.exists() else ""
        index = f"PIP_INDEX_URL={shlex.quote(os.environ['PIP_INDEX_URL'])} " if os.environ.get("PIP_INDEX_URL") else ""
        run(f"python3 -m venv {VENV} && {cert}{index}{VENV}/bin/pip install -q {shlex.join(pins())} "
            f"&& touch {VENV}/.installed", timeout=600)  # .installed: make's stamp that the venv is ready
        settings = {**stack_settings(endpoint, EXTRA_MANIFEST), "docker_service_environment": harness.INNER_DOCKERD_ENV,
                    "docker_daemon_options": INNER_DAEMON_OPTIONS}
        subprocess.run([harness.DOCKER, "exec", "-i", "-u", "fluxops", HOST, "sh", "-c",
                        f"cat > {CHECKOUT}/ansible/inventory/hosts.yml"], input=local_inventory(settings), text=True,
                       check=True)
        yield HOST
    finally:
        mirror.terminate()
        mirror.wait(timeout=10)
        if not os.environ.get("FXS_HOST_KEEP"):
            harness.remove_hosts([HOST])
            if ours:
                tarball.unlink(missing_ok=True)
                tarball.with_suffix(".id").unlink(missing_ok=True)


def test_make_deploy_host_localhost_provisions_the_machine_it_runs_on(host: str) -> None:
    done = make("deploy")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert recap(out)["localhost"]["failed"] == 0 and recap(out)["localhost"]["changed"] > 0
    flat = " ".join(out.split())
    assert "OS: Ubuntu 24.04" in flat and "WSL2: no; systemd: yes" in flat
    assert "tiny-flux: ready=True" in out
    # Docker came from the role and systemd manages it: what "needs a systemd machine" means.
    assert run("systemctl is-enabled docker; systemctl is-active docker").split() == ["enabled", "active"]
    assert "tiny-flux" in run("curl -sf http://127.0.0.1:8000/v1/models")
    assert run("cat /opt/fluxstack/state/last-good-image") == "fluxstack/runtime:dev"


def test_make_verify_host_localhost_passes(host: str) -> None:
    done = make("verify", "VERIFY_ARGS=-m 'not gpu'")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for check in ("docker is running and enabled", "services are running and healthy", "runtime answers ready",
                  "store files are present with the manifest sizes and verified", "hf token is in no container or "
                  "image metadata"):
        assert f"PASS  localhost: {check}" in lines, done.stdout


def test_a_second_local_deploy_changes_nothing(host: str) -> None:
    done = make("deploy")
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert recap(done.stdout)["localhost"]["changed"] == 0, done.stdout[-6000:]
