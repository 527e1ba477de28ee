"""The flux_stack role refuses the gateway without usable tokens, and never shows them doing so.

Runs the role for real on this machine (local connection) into temporary folders; it stops at the
token check, before any image, seed or container."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_driver_logic import play

BAD = "too-short-token"


@pytest.mark.parametrize(("tokens", "message"), [
    ([], "fluxstack_gateway is on but fluxstack_gateway_tokens is empty"),
    (["a" * 40, BAD], "1 of fluxstack_gateway_tokens are not 24-512 characters"),
])
def test_gateway_without_usable_tokens_is_refused(tmp_path: Path, tokens: list[str], message: str) -> None:
    done, _ = play(tmp_path, "flux_stack", "main", fluxstack_gateway=True, fluxstack_gateway_tokens=tokens,
                   fluxstack_root=str(tmp_path / "opt"), fluxstack_config_dir=str(tmp_path / "etc"),
                   fluxstack_store_dir=str(tmp_path / "models"), fluxstack_seed=False, fluxstack_start=False)
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0 and message in out, out[-3000:]
    assert "openssl rand -hex 32" in out
    assert BAD not in out and "a" * 40 not in out
    assert not (tmp_path / "etc" / "gateway-tokens").exists()
