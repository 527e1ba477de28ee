"""ansible-lint (production profile, offline), yamllint and ansible-playbook --syntax-check on ansible/."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    if not (BIN / args[0]).exists():
        pytest.skip(f"{BIN / args[0]} missing (make venv installs the pinned Ansible tools)")
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=REPO / "ansible", capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                                            "ANSIBLE_CONFIG": str(REPO / "ansible/ansible.cfg"), "NO_COLOR": "1"})


def test_yamllint_is_clean() -> None:
    done = run("yamllint", "--strict", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ansible_lint_production_profile_is_clean() -> None:
    done = run("ansible-lint", "--offline")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in done.stderr + done.stdout


@pytest.mark.parametrize("playbook", ["playbooks/site.yml", "playbooks/rollout.yml"])
def test_playbooks_pass_syntax_check(playbook: str) -> None:
    done = run("ansible-playbook", "-i", "inventory/hosts.example.yml", "--syntax-check", playbook)
    assert done.returncode == 0, done.stdout + done.stderr
