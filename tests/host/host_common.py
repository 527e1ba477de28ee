"""Helpers shared by the host checks (conftest.py holds the fixtures)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest


def inventory_variables(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The inventory's variables for a host testinfra reaches without Ansible (ansible_connection: local)."""
    inventory = request.config.getoption("ansible_inventory", None)
    spec = request.node.nodeid.partition("[")[2].rstrip("]")  # e.g. local://localhost? or ansible://gpu01
    name = spec.partition("://")[2] or "localhost"
    if not inventory:
        return {}
    done = subprocess.run(["ansible-inventory", "-i", inventory, "--host", name], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def containers(host: Any, pins: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """service -> docker inspect of its container."""
    out: dict[str, dict[str, Any]] = {}
    for service in pins["fluxstack_services"]:
        cid = host.check_output(f"docker ps -aq --filter label=com.docker.compose.project={pins['fluxstack_project']} "
                                f"--filter label=com.docker.compose.service={service}").split()
        if cid:
            out[service] = json.loads(host.check_output(f"docker inspect {cid[0]}"))[0]
    return out
