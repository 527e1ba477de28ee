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


def test_runtime_answers_ready(host: Any, pins: dict[str, Any]) -> None:
    if "runtime" not in pins["fluxstack_services"]:
        pytest.skip("the runtime is not among fluxstack_services")
    url = f"http://127.0.0.1:{pins['fluxstack_runtime_port']}/readyz"
    probe = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=10).status)"
    code = host.run(f"python3 -c {shlex.quote(probe)}")
    assert code.rc == 0 and code.stdout.strip() == "200", f"GET {url}: {code.stdout}{code.stderr}"


def test_ports_are_bound_where_configured(host: Any, pins: dict[str, Any]) -> None:
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
    assert (token_file.user, token_file.mode) == ("root", 0o640), "the token file must be root-owned, mode 0640"
    token = token_file.content_string.strip()
    assert token
    everything = host.check_output(
        "docker inspect $(docker ps -aq) $(docker images -q) 2>/dev/null; "
        "for i in $(docker images -q); do docker history --no-trunc $i; done; "
        f"cat {pins['fluxstack_root']}/.env")
    assert token not in everything, "the HF token appears in docker inspect, an image's history or .env"
