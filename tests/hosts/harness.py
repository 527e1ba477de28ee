"""Test hosts for the Ansible roles: systemd containers with sshd, reached over SSH like servers.

This machine's (and CI's) PID 1 is not systemd, so the hosts Ansible deploys to are containers
built from docker/testhost (a locally built Debian or Ubuntu base, see BASES, + systemd + sshd;
Docker itself is installed by the docker role). Each host gets its own /var/lib/docker volume, so
its Docker engine is its own. They cannot be --privileged here; the capabilities below are enough
for systemd and dockerd.

    python3 tests/hosts/harness.py up fxs-host-1 fxs-host-2     # prints the inventory path
    python3 tests/hosts/harness.py up --suite noble fxs-host-u  # an Ubuntu 24.04 host
    python3 tests/hosts/harness.py down fxs-host-1 fxs-host-2   # removes containers and volumes

Everything it creates is named fxs-host-* (containers, volumes, network, images).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = os.environ.get("DOCKER", "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")
NETWORK = "fxs-host-net"
STATE = Path(os.environ.get("FXS_HOST_STATE", "/var/tmp/fxs-host"))
# The recipe that works where --privileged does not (see docs/ansible.md).
RUN_FLAGS = [
    "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN", "--cap-add", "SYS_PTRACE", "--cap-add", "IPC_LOCK",
    "--cap-add", "SYS_MODULE", "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run", "--tmpfs", "/run/lock",
]
# What the inner dockerd needs in this nested setup (passed through the docker role's variable).
INNER_DOCKERD_ENV = {"DOCKER_ALLOW_IPV6_ON_IPV4_INTERFACE": "1"}


def docker(*args: str, check: bool = True, capture: bool = True, timeout: float = 900) -> str:
    done = subprocess.run([DOCKER, *args], capture_output=capture, text=True, timeout=timeout)
    if check and done.returncode:
        raise RuntimeError(f"docker {' '.join(args[:3])}… failed ({done.returncode}): {done.stderr[-2000:]}")
    return (done.stdout or "").strip()


def exists(kind: str, name: str) -> bool:
    return subprocess.run([DOCKER, kind, "inspect", name], capture_output=True).returncode == 0


# Every OS the test hosts come in: suite -> (base image under its production name, built locally by
# scripts/build-base-image.sh; Docker's packages, downloaded into the image's apt cache).
BASES: dict[str, tuple[str, str]] = {
    "trixie": ("debian:trixie-slim", "docker.io docker-cli docker-compose"),
    # Debian 12 has no compose v2 package; the role is told where the plugin is.
    "bookworm": ("debian:bookworm-slim", "docker.io"),
    "jammy": ("ubuntu:22.04", "docker.io docker-compose-v2"),
    "noble": ("ubuntu:24.04", "docker.io docker-compose-v2"),
}


def image_name(suite: str) -> str:
    return f"fxs-host-testhost:{suite}"


def build_image(suite: str = "trixie") -> str:
    """Build the test-host image from the suite's locally built base (cached by Docker)."""
    name = image_name(suite)
    base, packages = BASES[suite]
    if not exists("image", base):
        subprocess.run([str(REPO / "scripts/build-base-image.sh")], env={**os.environ, "SUITE": suite}, check=True)
    docker("build", "-q", "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"DOCKER_PACKAGES={packages}",
           "-t", name, str(REPO / "docker/testhost"), timeout=1800)
    return name


def ssh_key() -> Path:
    STATE.mkdir(parents=True, exist_ok=True)
    key = STATE / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fxs-host-test", "-f", str(key)],
                       check=True)
    return key


def network() -> str:
    if not exists("network", NETWORK):
        docker("network", "create", "--subnet", "172.31.77.0/24", NETWORK)
    return json.loads(docker("network", "inspect", NETWORK))[0]["IPAM"]["Config"][0].get("Gateway", "172.31.77.1")


def start_host(name: str, suite: str = "trixie", mounts: list[str] | None = None) -> str:
    """Start (or reuse) one host; return its IP address on the private network."""
    if not exists("container", name):
        key = ssh_key()
        volume = f"{name}-docker"
        args = ["run", "-d", "--name", name, "--hostname", name, "--network", NETWORK, *RUN_FLAGS,
                "-v", f"{volume}:/var/lib/docker", "--label", "fxs-host=1"]
        for m in mounts or []:
            args += ["-v", m]
        docker(*args, image_name(suite))
        docker("cp", f"{key}.pub", f"{name}:/home/fluxops/.ssh/authorized_keys")
        docker("exec", name, "chown", "fluxops:fluxops", "/home/fluxops/.ssh/authorized_keys")
    ip = docker("inspect", "-f", f"{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}", name)
    wait_for_ssh(name, ip)
    return ip


def ssh_args(ip: str) -> list[str]:
    return ["ssh", "-i", str(ssh_key()), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", f"fluxops@{ip}"]


def wait_for_ssh(name: str, ip: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        done = subprocess.run([*ssh_args(ip), "systemctl is-system-running --wait || true"],
                              capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return
        last = done.stderr.strip()
        time.sleep(1)
    logs = docker("logs", "--tail", "30", name, check=False)
    raise RuntimeError(f"test host {name} ({ip}) did not answer over SSH in {timeout:.0f}s: {last}\n{logs}")


def inventory(hosts: dict[str, str], path: Path, extra_vars: dict | None = None) -> Path:
    """Write an inventory for the hosts (name -> IP) in group `gpu` (as a real site would)."""
    # Test settings are host variables: like a site's host_vars they override group_vars/all.yml.
    settings = {
        "ansible_user": "fluxops", "ansible_become": True, "ansible_ssh_private_key_file": str(ssh_key()),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        "docker_service_environment": INNER_DOCKERD_ENV, **(extra_vars or {})}
    doc = {"all": {"children": {"gpu": {"hosts": {n: {"ansible_host": ip, **settings} for n, ip in hosts.items()}}}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    # group_vars/all.yml of the shipped inventory, so pins come from the same place as at a site.
    link = path.parent / "group_vars"
    if not link.exists():
        link.symlink_to(REPO / "ansible/inventory/group_vars")
    return path


def remove_hosts(names: list[str]) -> None:
    for name in names:
        docker("rm", "-f", "-v", name, check=False)
        docker("volume", "rm", "-f", f"{name}-docker", check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--suite", default="trixie", choices=sorted(BASES))
    parser.add_argument("--mount", action="append", default=[], help="extra -v for the host containers")
    args = parser.parse_args()
    if args.action == "down":
        remove_hosts(args.names)
        return 0
    build_image(args.suite)
    network()
    hosts = {n: start_host(n, args.suite, args.mount) for n in args.names}
    print(inventory(hosts, STATE / "inventory" / "hosts.yml"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
