"""testinfra checks of a deployed fluxstack host (`make verify HOST=gpu01`).

They run against the Ansible inventory (`--hosts=ansible://gpu01 --ansible-inventory=…`) and read
the pins from it (host.ansible.get_variables()), so they check what the playbook was told to do.
Without --hosts (e.g. inside `make test`) they are skipped: they describe a host, not this checkout."""

from __future__ import annotations

from typing import Any

import pytest
from host_common import inventory_variables

DEFAULTS: dict[str, Any] = {
    "fluxstack_root": "/opt/fluxstack", "fluxstack_store_dir": "/srv/fluxstack/models",
    "fluxstack_config_dir": "/etc/fluxstack", "fluxstack_project": "fluxstack",
    "fluxstack_services": ["runtime", "comfyui"], "fluxstack_manifest": "flux-dev-runtime",
    "fluxstack_bind": "127.0.0.1", "fluxstack_runtime_port": 8000, "fluxstack_comfyui_port": 8188,
    "fluxstack_image": "fluxstack/runtime:dev", "fluxstack_service_uid": 10001, "fluxstack_service_gid": 10001,
    "fluxstack_gateway": False, "fluxstack_gateway_port": 8443,
    "nvidia_driver_install": "auto", "nvidia_driver_version": "", "nvidia_driver_packages": None,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU on the host; skipped with the reason elsewhere")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("hosts", None):
        return
    skip = pytest.mark.skip(reason="host checks need a target: make verify HOST=gpu01 (testinfra --hosts=ansible://…)")
    for item in items:
        if "tests/host/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def pins(host: Any, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The inventory's variables for this host, over the role defaults the checks rely on."""
    found = host.ansible.get_variables() if host.backend.NAME == "ansible" else inventory_variables(request)
    ours = {k: v for k, v in found.items() if k in DEFAULTS or k.startswith(("fluxstack_", "nvidia_"))}
    return {**DEFAULTS, **ours}
