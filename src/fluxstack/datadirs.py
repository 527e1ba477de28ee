"""Where the data fluxstack ships (manifests, workflows) is found: one rule for every folder."""

from __future__ import annotations

import os
from pathlib import Path


def shipped_dir(env_var: str, folder: str, marker: str) -> Path:
    """$env_var, else ./folder when it holds marker, else that folder of the checkout this package lives in."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    cwd = Path.cwd() / folder
    if (cwd / marker).is_file():
        return cwd
    return Path(__file__).resolve().parents[2] / folder
