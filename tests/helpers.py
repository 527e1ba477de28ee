"""Shared test helpers: generated model files, manifests, and real fluxstack processes."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
DOCKER = os.environ.get("DOCKER", "docker")
COMFYUI_SRC = os.environ.get("COMFYUI_SRC", "")
COMFYUI_TAG = "fluxstack/comfyui:test"
needs_comfyui_src = pytest.mark.skipif(not COMFYUI_SRC, reason="COMFYUI_SRC is not set: no ComfyUI source tree to "
                                       "build from (GitHub is unreachable here; CI has none)")


def free_port() -> int:
    """A TCP port free on loopback right now (for a server or a published container port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_comfyui_image(*extra: str) -> subprocess.CompletedProcess[str]:
    """`make image-comfyui` from COMFYUI_SRC (COMFYUI_TREE overrides the pinned tree hash)."""
    args = [f"COMFYUI_SRC={COMFYUI_SRC}", f"COMFYUI_IMAGE={COMFYUI_TAG}", f"DOCKER={DOCKER}"]
    if os.environ.get("COMFYUI_TREE"):
        args.append(f"COMFYUI_TREE={os.environ['COMFYUI_TREE']}")
    return subprocess.run(["make", "image-comfyui", *args, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=3000)


def write_random(path: Path, size: int, seed: int) -> str:
    """Write size pseudo-random bytes (deterministic per seed); return their sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sha = hashlib.sha256()
    block = 16 << 20
    with open(path, "wb") as fh:
        left = size
        while left:
            data = rng.randbytes(min(block, left))
            sha.update(data)
            fh.write(data)
            left -= len(data)
    return sha.hexdigest()


@dataclass
class Model:
    """A generated file in a 'source' store plus its manifest entry."""

    repo: str
    path: str
    dest: str
    size: int
    sha256: str
    gated: bool = False
    revision: str = "main"

    def entry(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "path": self.path, "dest": self.dest,
                "size": self.size, "sha256": self.sha256, "gated": self.gated, "license": "apache-2.0"}


def make_models(store: Path, specs: list[tuple[str, str, str, int]], gated: bool = False) -> list[Model]:
    """specs: (repo, path in repo, dest in store, size)."""
    models = []
    for i, (repo, path, dest, size) in enumerate(specs):
        seed = int(hashlib.sha1(f"{repo}/{path}/{size}/{i}".encode()).hexdigest()[:8], 16)
        sha = write_random(store / dest, size, seed)
        models.append(Model(repo, path, dest, size, sha, gated))
    return models


def write_manifest(folder: Path, name: str, models: list[Model], include: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc: dict = {"name": name, "description": f"test manifest {name}"}
    if include:
        doc["include"] = include
    doc["files"] = [m.entry() for m in models]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FLUXSTACK_"))}
    env["FLUXSTACK_MANIFESTS_DIR"] = str(REPO / "manifests")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.update(extra)
    return env


def fluxstack(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300,
              check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "fluxstack", *map(str, args)], capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"fluxstack {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Mirror:
    proc: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)

    def requests(self, pattern: str = "") -> list[str]:
        return [line for line in self.log if '"' in line and pattern in line]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_mirror(models_dir: Path, *args: str | Path, env: dict[str, str] | None = None) -> Mirror:
    """Run `fluxstack mirror serve` in its own process on a free loopback port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluxstack", "mirror", "serve", "--models-dir", str(models_dir), "--port", "0",
         *map(str, args)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env or cli_env(), cwd=REPO)
    assert proc.stderr is not None
    lines: list[str] = []
    ready = threading.Event()
    url_box: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if found and not url_box:
                url_box.append(found.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 30
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("mirror did not start:\n" + "\n".join(lines))
    if not url_box:
        raise AssertionError("mirror exited:\n" + "\n".join(lines))
    return Mirror(proc, url_box[0], lines)


@dataclass
class Upstream:
    """A generated 'Hub': files in a store, the manifest naming them, and a mirror serving them."""

    root: Path
    manifest: Path
    models: list[Model]
    mirror: Mirror
