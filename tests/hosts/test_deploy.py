"""`make deploy` / `make verify` / `make check` for real: Ansible over SSH into a systemd test host
(tests/hosts/harness.py), Docker installed by the docker role from Debian's packages, the image
loaded from a tarball, the tiny model seeded from a `fluxstack mirror serve`, the runtime started
on CPU. The NVIDIA roles run too and skip with their message: the test hosts have no GPU.

The tests in this module run in order against one host (fxs-host-1)."""

from __future__ import annotations

import json

from hostlab import TOKEN, Lab, recap

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
    assert lab.sh(HOST, "stat -c '%U %g %a' /etc/fluxstack/hf_token") == "root 10001 640"
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
