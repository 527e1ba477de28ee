"""The NVIDIA roles' decisions, run for real by ansible-playbook on this machine (local connection).

What cannot exist here (an NVIDIA kernel module, a GPU on the PCI bus, WSL2) is given as fake
files through the roles' path variables (nvidia_driver_proc_version_file, preflight_pci_devices_dir,
preflight_wsl_markers): the same Jinja and tasks that run on a real host read them. Nothing is
installed: only the decision, WSL2 and preflight tasks run, and the reboot task is reached only
through the local-connection refusal. The real-GPU counterpart is the H100 run in docs/ansible.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(__file__).parent / "playbooks" / "driver_decision.yml"
ANSIBLE_PLAYBOOK = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "ansible-playbook"
PIN = "580.95.05"
PROC_OPEN = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {v}  Release Build  "
             "(dvs-builder@U16-I3-B03-4-3)  Thu Sep 25 19:55:05 UTC 2025\nGCC version:  gcc version 13.3.0\n")
PROC_LEGACY = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  {v}  Tue Mar  5 22:46:13 UTC 2024\n"


def play(tmp_path: Path, role: str, tasks: str, env: dict[str, str] | None = None,
         **extra: object) -> tuple[subprocess.CompletedProcess[str], dict]:
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.skip(f"{ANSIBLE_PLAYBOOK} missing (make venv installs ansible-core)")
    result = tmp_path / "result.json"
    variables = {"ansible_python_interpreter": sys.executable, "role_under_test": role, "tasks_under_test": tasks,
                 "result_file": str(result),
                 "nvidia_driver_version": PIN, "nvidia_driver_sys_version_file": str(tmp_path / "no-sys"),
                 "nvidia_driver_proc_version_file": str(tmp_path / "no-proc"), **extra}
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    command = [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", str(PLAYBOOK), "-e", f"@{tmp_path / 'vars.json'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible/ansible.cfg"),
                               "ANSIBLE_NOCOLOR": "1", **(env or {})})
    return done, (json.loads(result.read_text()) if result.exists() else {})


def proc(tmp_path: Path, text: str) -> str:
    path = tmp_path / "proc-version"
    path.write_text(text)
    return str(path)


def test_loaded_equals_pin_and_nothing_changed_means_no_reboot(tmp_path: Path) -> None:
    done, out = play(tmp_path, "nvidia_driver", "decide", nvidia_driver_do_install=True,
                     nvidia_driver_proc_version_file=proc(tmp_path, PROC_OPEN.format(v=PIN)),
                     nvidia_driver_packages_result={"changed": False})
    assert done.returncode == 0, done.stdout[-3000:]
    assert (out["loaded"], out["reboot_required"]) == (PIN, False)


def test_loaded_older_than_pin_means_reboot_with_the_versions_named(tmp_path: Path) -> None:
    done, out = play(tmp_path, "nvidia_driver", "decide", nvidia_driver_do_install=True,
                     nvidia_driver_proc_version_file=proc(tmp_path, PROC_LEGACY.format(v="570.86.15")),
                     nvidia_driver_packages_result={"changed": False})
    assert done.returncode == 0, done.stdout[-3000:]
    assert out["reboot_required"] is True
    assert out["reboot_reason"] == f"the loaded module is 570.86.15, the pin is {PIN}"


def test_changed_packages_mean_reboot_even_when_versions_match(tmp_path: Path) -> None:
    _, out = play(tmp_path, "nvidia_driver", "decide", nvidia_driver_do_install=True,
                  nvidia_driver_proc_version_file=proc(tmp_path, PROC_OPEN.format(v=PIN)),
                  nvidia_driver_packages_result={"changed": True})
    assert out["reboot_required"] is True and out["reboot_reason"] == "the driver packages changed in this run"


def test_no_module_loaded_means_reboot(tmp_path: Path) -> None:
    _, out = play(tmp_path, "nvidia_driver", "decide", nvidia_driver_do_install=True,
                  nvidia_driver_packages_result={"changed": False})
    assert (out["loaded"], out["reboot_required"]) == ("", True)
    assert out["reboot_reason"] == "no NVIDIA kernel module is loaded"


def test_sys_module_version_is_read_when_proc_is_absent(tmp_path: Path) -> None:
    sys_file = tmp_path / "sys-version"
    sys_file.write_text(f"{PIN}\n")
    _, out = play(tmp_path, "nvidia_driver", "decide", nvidia_driver_do_install=True,
                  nvidia_driver_sys_version_file=str(sys_file), nvidia_driver_packages_result={"changed": False})
    assert (out["loaded"], out["reboot_required"]) == (PIN, False)


def test_verify_only_fails_on_drift_and_never_plans_a_reboot(tmp_path: Path) -> None:
    done, _ = play(tmp_path, "nvidia_driver", "decide", nvidia_driver_do_install=False,
                   nvidia_driver_proc_version_file=proc(tmp_path, PROC_OPEN.format(v="580.82.07")))
    assert done.returncode != 0
    flat = " ".join(done.stdout.split())
    assert f"Driver drift on localhost: the loaded NVIDIA module is 580.82.07 but the pin is {PIN}" in flat


def test_verify_only_passes_when_the_loaded_driver_is_the_pin(tmp_path: Path) -> None:
    done, out = play(tmp_path, "nvidia_driver", "decide", nvidia_driver_do_install=False,
                     nvidia_driver_proc_version_file=proc(tmp_path, PROC_OPEN.format(v=PIN)))
    assert done.returncode == 0, done.stdout[-3000:]
    assert out["reboot_required"] is False


def test_a_local_connection_is_never_rebooted(tmp_path: Path) -> None:
    done, _ = play(tmp_path, "nvidia_driver", "reboot", nvidia_driver_reboot_reason="the driver packages changed")
    assert done.returncode != 0
    flat = " ".join(done.stdout.split())
    assert "localhost needs a reboot (the driver packages changed), but it is reached over a local connection" in flat
    assert "Reboot it yourself, then run the same command again" in flat


def test_wsl2_installs_no_linux_driver(tmp_path: Path) -> None:
    done, out = play(tmp_path, "nvidia_driver", "main", nvidia_driver_install="auto", fluxstack_wsl2=True,
                     fluxstack_gpu_present=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert out["do_install"] is False
    assert "WSL2 uses the Windows driver" in " ".join(done.stdout.split())


def test_wsl2_refuses_a_forced_driver_install(tmp_path: Path) -> None:
    done, _ = play(tmp_path, "nvidia_driver", "main", nvidia_driver_install=True, fluxstack_wsl2=True,
                   fluxstack_gpu_present=True)
    assert done.returncode != 0
    assert "Installing a Linux driver here breaks CUDA" in " ".join(done.stdout.split())


def test_preflight_detects_an_nvidia_gpu_and_wsl2_from_the_files(tmp_path: Path) -> None:
    pci = tmp_path / "pci"
    for dev, vendor, cls in (("0000:00:01.0", "0x8086", "0x060000"), ("0000:17:00.0", "0x10de", "0x030200"),
                             ("0000:18:00.0", "0x10de", "0x068000")):  # host bridge, H100, NVSwitch
        (pci / dev).mkdir(parents=True)
        (pci / dev / "vendor").write_text(vendor + "\n")
        (pci / dev / "class").write_text(cls + "\n")
    dxg = tmp_path / "dxg"
    dxg.write_text("")
    done, out = play(tmp_path, "preflight", "main", preflight_mode="warn", preflight_pci_devices_dir=str(pci),
                     preflight_wsl_markers=[str(dxg)], preflight_store_dir=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:]
    assert (out["gpu_present"], out["wsl2"]) == (True, True)
    flat = " ".join(done.stdout.split())
    assert "WARNING:" in flat and "GPU memory: 0.0 GiB (nvidia-smi not available yet) (need 22 GiB)" in flat


def test_preflight_without_an_nvidia_device_finds_no_gpu(tmp_path: Path) -> None:
    pci = tmp_path / "pci" / "0000:00:02.0"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x1af4\n")
    (pci / "class").write_text("0x030000\n")
    _, out = play(tmp_path, "preflight", "main", preflight_mode="warn", preflight_pci_devices_dir=str(pci.parent),
                  preflight_wsl_markers=[str(tmp_path / "none")], preflight_store_dir=str(tmp_path))
    assert (out["gpu_present"], out["wsl2"]) == (False, False)


def test_the_stack_role_says_what_it_cannot_manage_without_a_docker_engine(tmp_path: Path) -> None:
    """This machine's PID 1 is not systemd, like WSL2 without systemd; DOCKER_HOST points at no engine."""
    done, _ = play(tmp_path, "flux_stack", "main", env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    assert done.returncode != 0
    flat = " ".join(done.stdout.split())
    assert "The stack cannot be managed on localhost: the Docker engine does not answer" in flat
    if Path("/proc/1/comm").read_text().strip() != "systemd":
        assert "so Ansible cannot start Docker: start dockerd yourself, or enable systemd (WSL2: docs/wsl2.md)" in flat
