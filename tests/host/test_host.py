"""One check per thing a user of a fluxstack host relies on (make verify HOST=…)."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest
from host_common import containers


def test_docker_is_running_and_enabled(host: Any) -> None:
    docker = host.service("docker")
    assert docker.is_running, "docker.service is not running: systemctl status docker"
    assert docker.is_enabled, "docker.service is not enabled at boot: systemctl enable docker"


def test_docker_compose_v2_plugin_answers(host: Any) -> None:
    version = host.run("docker compose version --short")
    assert version.rc == 0 and version.stdout.strip().split(".")[0].lstrip("v") == "2", version.stderr


def test_services_are_running_and_healthy(host: Any, pins: dict[str, Any]) -> None:
    found = containers(host, pins)
    for service in pins["fluxstack_services"]:
        assert service in found, f"no container for service {service} (project {pins['fluxstack_project']})"
        state = found[service]["State"]
        assert state["Status"] == "running", f"{service} is {state['Status']}"
        health = state.get("Health", {}).get("Status")
        assert health in (None, "healthy"), f"{service} health is {health}"


def secret_file_ok(f: Any, pins: dict[str, Any]) -> bool:
    # Compose mounts secret files as they are, so the services' user must own them; nobody else may read them.
    return f.uid == int(pins["fluxstack_service_uid"]) and f.mode in (0o400, 0o600)


def gateway_status(host: Any, pins: dict[str, Any], path: str, with_token: bool) -> str:
    """HTTP status of GET path through the gateway on the host; the token is read there, never printed."""
    probe = (
        "import ssl, sys, urllib.request as u, urllib.error as e\n"
        f"req = u.Request('https://127.0.0.1:{pins['fluxstack_gateway_port']}{path}')\n"
        f"if {with_token}:\n"
        f"    t = open('{pins['fluxstack_config_dir']}/gateway-tokens').readline().strip()\n"
        "    req.add_header('Authorization', 'Bearer ' + t)\n"
        "try:\n    print(u.urlopen(req, timeout=10, context=ssl._create_unverified_context()).status)\n"
        "except e.HTTPError as err:\n    print(err.code)\n")
    return host.check_output(f"python3 -c {shlex.quote(probe)}").strip()


def test_runtime_answers_ready(host: Any, pins: dict[str, Any]) -> None:
    if "runtime" not in pins["fluxstack_services"]:
        pytest.skip("the runtime is not among fluxstack_services")
    if pins["fluxstack_gateway"]:
        assert gateway_status(host, pins, "/readyz", with_token=True) == "200", "GET /readyz through the gateway"
        return
    url = f"http://127.0.0.1:{pins['fluxstack_runtime_port']}/readyz"
    probe = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=10).status)"
    code = host.run(f"python3 -c {shlex.quote(probe)}")
    assert code.rc == 0 and code.stdout.strip() == "200", f"GET {url}: {code.stdout}{code.stderr}"


def test_ports_are_bound_where_configured(host: Any, pins: dict[str, Any]) -> None:
    if pins["fluxstack_gateway"]:
        pytest.skip("the gateway is on: the services publish no port (see the gateway checks)")
    ports = {"runtime": pins["fluxstack_runtime_port"], "comfyui": pins["fluxstack_comfyui_port"]}
    bind = pins["fluxstack_bind"]
    for service in pins["fluxstack_services"]:
        port = ports.get(service)
        if port is None:
            continue
        assert host.socket(f"tcp://{bind}:{port}").is_listening, f"{service} is not listening on {bind}:{port}"
        if bind == "127.0.0.1":
            assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening, f"{service} port {port} is exposed on 0.0.0.0"


def test_store_files_are_present_with_the_manifest_sizes_and_verified(host: Any, pins: dict[str, Any]) -> None:
    root, manifest, store = pins["fluxstack_root"], pins["fluxstack_manifest"], pins["fluxstack_store_dir"]
    # The same `fluxstack seed --verify` as everywhere else: downloads nothing, exit 1 on a missing or changed file.
    done = host.run(f"cd {root} && docker compose run --rm --no-deps -T seeder seed {manifest} --models-dir /models "
                    "--verify --json")
    assert done.rc == 0, f"fluxstack seed {manifest} --verify exited {done.rc}: {done.stderr[-800:]}"
    report = json.loads(done.stdout)
    assert report["ready"], report
    for entry in report["files"]:
        assert entry["status"] in ("cached", "verified"), entry
        on_disk = host.file(f"{store}/{entry['dest']}")
        assert on_disk.exists and on_disk.size == entry["size"], f"{entry['dest']}: {on_disk.size} != {entry['size']}"
    assert host.file(f"{store}/.fluxstack/ready-{manifest}.json").exists


def test_containers_run_as_non_root(host: Any, pins: dict[str, Any]) -> None:
    for service, info in containers(host, pins).items():
        uid = host.check_output(f"docker exec {info['Id']} id -u")
        assert uid.strip() != "0", f"{service} runs as root"


def test_store_is_mounted_read_only_in_services(host: Any, pins: dict[str, Any]) -> None:
    for service, info in containers(host, pins).items():
        mounts = [m for m in info["Mounts"] if m["Destination"] == "/models"]
        assert mounts, f"{service} has no /models mount"
        assert not mounts[0]["RW"], f"{service} mounts the model store read-write"


def test_hf_token_is_in_no_container_or_image_metadata(host: Any, pins: dict[str, Any]) -> None:
    token_file = host.file(f"{pins['fluxstack_config_dir']}/hf_token")
    if not token_file.exists:
        pytest.skip("no Hugging Face token configured on this host")
    assert secret_file_ok(token_file, pins), "the token file must belong to the services' uid, mode 0400 or 0600"
    token = token_file.content_string.strip()
    assert token
    everything = host.check_output(
        "docker inspect $(docker ps -aq) $(docker images -q) 2>/dev/null; "
        "for i in $(docker images -q); do docker history --no-trunc $i; done; "
        f"cat {pins['fluxstack_root']}/.env")
    assert token not in everything, "the HF token appears in docker inspect, an image's history or .env"


def test_containers_are_hardened(host: Any, pins: dict[str, Any]) -> None:
    for service, info in containers(host, pins).items():
        config = info["HostConfig"]
        assert config["ReadonlyRootfs"], f"{service} has a writable root filesystem"
        assert config["CapDrop"] == ["ALL"], f"{service} keeps capabilities: CapDrop={config['CapDrop']}"
        assert "no-new-privileges:true" in (config["SecurityOpt"] or []), f"{service} can gain privileges"


def test_only_the_gateway_is_published_beyond_loopback(host: Any, pins: dict[str, Any]) -> None:
    if not pins["fluxstack_gateway"]:
        pytest.skip("the gateway is off: services publish on fluxstack_bind (checked above)")
    published = host.check_output("docker ps --format '{{.Names}} {{.Ports}}'").splitlines()
    exposed = [line for line in published if "->" in line]
    assert exposed and all(f":{pins['fluxstack_gateway_port']}->8443/tcp" in line and "gateway" in line.split()[0]
                           for line in exposed), f"published ports other than the gateway's: {exposed}"
    allowed = {int(pins["fluxstack_gateway_port"]), 22}
    for socket in host.socket.get_listening_sockets():
        proto, _, address = socket.partition("://")
        if proto != "tcp":
            continue
        ip, _, port = address.rpartition(":")
        if not ip.startswith(("127.", "::1", "[::1]")):
            assert int(port) in allowed, f"{address} listens beyond loopback and is not the gateway"


def test_gateway_requires_a_token_and_accepts_the_provisioned_one(host: Any, pins: dict[str, Any]) -> None:
    if not pins["fluxstack_gateway"]:
        pytest.skip("the gateway is off")
    assert gateway_status(host, pins, "/healthz", with_token=False) == "200"
    assert gateway_status(host, pins, "/v1/models", with_token=False) == "401"
    assert gateway_status(host, pins, "/v1/models", with_token=True) == "200"


def test_gateway_secrets_belong_to_the_gateway_user_only(host: Any, pins: dict[str, Any]) -> None:
    if not pins["fluxstack_gateway"]:
        pytest.skip("the gateway is off")
    for name in ("gateway-tokens", "gateway-tls.key"):
        f = host.file(f"{pins['fluxstack_config_dir']}/{name}")
        if f.exists or name == "gateway-tokens":
            assert secret_file_ok(f, pins), f"{f.path}: uid {f.uid}, mode {oct(f.mode)}; want the services' uid, 0400"
