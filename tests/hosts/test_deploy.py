"""`make deploy` / `make verify` / `make check` for real: Ansible over SSH into a systemd test host
(tests/hosts/harness.py), Docker installed by the docker role from Debian's packages, the image
loaded from a tarball, the tiny model seeded from a `fluxstack mirror serve`, the runtime started
on CPU. The NVIDIA roles run too and skip with their message: the test hosts have no GPU.

The tests in this module run in order against one host (fxs-host-1)."""

from __future__ import annotations

import json
import subprocess

import harness
import yaml
from hostlab import REPO, TOKEN, Lab, recap

HOST = "fxs-host-1"


def test_make_deploy_turns_a_bare_host_into_a_serving_one(lab: Lab) -> None:
    done = lab.make("deploy", HOST)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert recap(out)[HOST]["failed"] == 0 and recap(out)[HOST]["changed"] > 0
    # No GPU here: the driver and toolkit roles say why they did nothing.
    assert "NVIDIA driver: not installed on fxs-host-1 - no NVIDIA GPU found on the PCI bus" in " ".join(out.split())
    assert "NVIDIA Container Toolkit: skipped on fxs-host-1 - no NVIDIA GPU found" in " ".join(out.split())
    assert "tiny-flux: ready=True" in out
    # The stack answers on the host, on 127.0.0.1 only.
    models = json.loads(lab.sh(HOST, "curl -sf http://127.0.0.1:8000/v1/models"))
    assert models["data"][0]["id"] == "tiny-flux" or "tiny-flux" in json.dumps(models)
    assert lab.sh(HOST, "cat /opt/fluxstack/state/last-good-image") == "fluxstack/runtime:dev"


def test_make_verify_passes_on_the_deployed_host(lab: Lab) -> None:
    done = lab.make("verify", HOST)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for check in ("docker is running and enabled", "services are running and healthy",
                  "ports are bound where configured", "store files are present with the manifest sizes and verified",
                  "containers run as non root", "store is mounted read only in services",
                  "hf token is in no container or image metadata"):
        assert f"PASS  {HOST}: {check}" in lines, done.stdout
    assert any(line.startswith(f"SKIP  {HOST}: nvidia smi lists the gpus - no NVIDIA GPU") for line in lines)


def test_make_verify_json_and_a_failing_check_exit_1(lab: Lab) -> None:
    lab.sh(HOST, "cd /opt/fluxstack && docker compose stop runtime")
    try:
        done = lab.make("verify", HOST, "VERIFY_ARGS=--json -m 'not gpu'")
        assert done.returncode != 0  # make turns verify.py's exit 1 into its own 2
        assert "verify] Error 1" in done.stderr  # verify.py exited 1: a check failed
        results = {r["check"]: r for r in json.loads(done.stdout)["results"]}
        assert results["services are running and healthy"]["outcome"] == "fail"
        assert "runtime is exited" in results["services are running and healthy"]["detail"]
        assert results["docker is running and enabled"]["outcome"] == "pass"
    finally:
        lab.sh(HOST, "cd /opt/fluxstack && docker compose up -d --wait --no-deps runtime")


def test_a_second_deploy_changes_nothing(lab: Lab) -> None:
    done = lab.make("deploy", HOST)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert recap(done.stdout)[HOST]["changed"] == 0, done.stdout[-6000:]


def test_make_check_reports_no_change_on_a_converged_host(lab: Lab) -> None:
    done = lab.make("check", HOST)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert recap(done.stdout)[HOST]["changed"] == 0, done.stdout[-6000:]


def test_the_token_never_reaches_ansible_output_and_its_file_is_restricted(lab: Lab) -> None:
    done = lab.make("deploy", HOST, "ANSIBLE_ARGS=-v --tags flux_stack")
    assert done.returncode == 0
    assert TOKEN not in done.stdout + done.stderr
    assert "censored: 'the output has been hidden due to the fact that ''no_log: true''" in done.stdout
    assert lab.sh(HOST, "stat -c '%u %g %a' /etc/fluxstack/hf_token") == "10001 10001 400"
    assert TOKEN not in lab.sh(HOST, "docker inspect $(docker ps -aq); cat /opt/fluxstack/.env")


def test_preflight_enforce_names_the_requirement_and_the_measured_value(lab: Lab) -> None:
    done = lab.make("deploy", HOST, "ANSIBLE_ARGS=--tags preflight -e preflight_min_ram_gb=4096")
    assert done.returncode != 0
    flat = " ".join(done.stdout.split())
    assert "Preflight failed on fxs-host-1: RAM:" in flat and "GiB (need 4096 GiB)" in flat
    assert "preflight_mode: warn" in flat


def test_usage_errors_name_what_is_missing(lab: Lab) -> None:
    done = lab.make("deploy", "")
    assert done.returncode == 2 and "usage: make deploy HOST=gpu01" in done.stderr
    done = lab.make("verify", "no-such-host")
    assert done.returncode == 2 and "'no-such-host' matches no host" in done.stderr


GATEWAY_IMAGE = "fluxstack/gateway:dev"
GATEWAY_TOKEN = "fxsGATEWAYtoken-0123456789abcdef0123456789"


def test_the_gateway_mode_provisions_its_token_and_is_the_only_way_in(lab: Lab) -> None:
    """fluxstack_gateway on: the token file provisioned (no_log), the runtime unpublished, only the
    gateway port beyond loopback, requests need the token; then the host goes back to plain mode."""
    if subprocess.run([harness.DOCKER, "image", "inspect", GATEWAY_IMAGE], capture_output=True).returncode:
        built = subprocess.run(["make", "image-gateway", f"DOCKER={harness.DOCKER}"], cwd=REPO, capture_output=True,
                               text=True, timeout=1800)
        assert built.returncode == 0, built.stderr[-3000:]
    tarball = lab.tarball.parent / "gateway.tar"  # the folder is mounted at /srv/images on every host
    subprocess.run([harness.DOCKER, "save", "-o", str(tarball), GATEWAY_IMAGE], check=True, timeout=600)
    # The same inventory with the gateway on for this host (next to it, so it shares its group_vars).
    doc = yaml.safe_load(lab.inventory.read_text())
    host_vars = doc["all"]["children"]["gpu"]["hosts"][HOST]
    host_vars.update({"fluxstack_gateway": True, "fluxstack_gateway_tokens": [GATEWAY_TOKEN],
                      "fluxstack_image_tarballs": {**host_vars["fluxstack_image_tarballs"],
                                                   GATEWAY_IMAGE: "/srv/images/gateway.tar"}})
    gateway_inventory = lab.inventory.with_name("gateway-hosts.yml")
    gateway_inventory.write_text(yaml.safe_dump(doc))
    with_gateway = f"INVENTORY={gateway_inventory}"
    try:
        done = lab.make("deploy", HOST, with_gateway, "ANSIBLE_ARGS=-v")
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-6000:]
        assert GATEWAY_TOKEN not in out and TOKEN not in out
        assert lab.sh(HOST, "stat -c '%u %a' /etc/fluxstack/gateway-tokens") == "10001 400"
        assert lab.sh(HOST, "stat -c '%u %a' /etc/fluxstack/hf_token") == "10001 400"
        assert GATEWAY_TOKEN not in lab.sh(HOST, "docker inspect $(docker ps -aq); cat /opt/fluxstack/.env; "
                                                 "docker logs fluxstack-gateway-1 2>&1")
        # The runtime is reachable only through the gateway now, and only with the token.
        assert lab.sh(HOST, "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/healthz", check=False) \
            in ("000", "")
        status = "curl -sk -o /dev/null -w '%{http_code}' https://127.0.0.1:8443/v1/models"
        assert lab.sh(HOST, status) == "401"
        assert lab.sh(HOST, status + " -H @/dev/stdin <<EOF\nAuthorization: Bearer $(cat /etc/fluxstack/gateway-tokens)"
                            "\nEOF") == "200"
        verify = lab.make("verify", HOST, with_gateway, "VERIFY_ARGS=-m 'not gpu'")
        lines = verify.stdout.splitlines()
        for check in ("only the gateway is published beyond loopback", "containers are hardened",
                      "gateway requires a token and accepts the provisioned one",
                      "gateway secrets belong to the gateway user only", "runtime answers ready"):
            assert f"PASS  {HOST}: {check}" in lines, verify.stdout + verify.stderr[-2000:]
        again = lab.make("deploy", HOST, with_gateway)
        assert again.returncode == 0 and recap(again.stdout)[HOST]["changed"] == 0, again.stdout[-4000:]
    finally:
        back = lab.make("deploy", HOST)
        lab.sh(HOST, "cd /opt/fluxstack && docker rm -f fluxstack-gateway-1", check=False)
        tarball.unlink(missing_ok=True)
        assert back.returncode == 0, (back.stdout + back.stderr)[-4000:]
