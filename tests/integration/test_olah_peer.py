"""A second, independent mirror implementation: olah (PyPI) serving a local git repo, fully offline.

olah differs from the Hub where a client must cope: it ignores Range (always 200 with the
whole file), sends no Content-Length on GET and an unquoted git-blob ETag. The seeder must
still produce verified files from it.
"""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import REPO, MiB, Model, fluxstack, free_port, write_manifest, write_random

OLAH_CLI = Path(os.environ.get("OLAH_CLI", REPO / ".venv-olah" / "bin" / "olah-cli")).absolute()




@pytest.fixture
def olah(tmp_path: Path) -> Iterator[tuple[str, list[Model]]]:
    if not OLAH_CLI.exists():
        pytest.fail(f"olah is not installed at {OLAH_CLI}; `make test` installs it (make .venv-olah)")
    repo_dir = tmp_path / "mirrors" / "models" / "peer-org" / "peer-model"
    repo_dir.mkdir(parents=True)
    files = {"small.safetensors": 2 * MiB + 11, "big/transformer.safetensors": 70 * MiB + 3}
    models = []
    for i, (path, size) in enumerate(files.items()):
        sha = write_random(repo_dir / path, size, seed=100 + i)
        models.append(Model("peer-org/peer-model", path, f"diffusion_models/peer-{i}.safetensors", size, sha))
    git = ["git", "-C", str(repo_dir), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo_dir)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "weights"], check=True)
    port = free_port()
    config = tmp_path / "olah.toml"
    config.write_text(f"""[basic]
host = "127.0.0.1"
port = {port}
repos-path = "{tmp_path / 'olah-cache'}"
mirrors-path = ["{tmp_path / 'mirrors'}"]
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"

[accessibility]
offline = true
""")
    log = open(tmp_path / "olah.out", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(OLAH_CLI), "-c", str(config)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/models/peer-org/peer-model/revision/main", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("olah did not start:\n" + (tmp_path / "olah.out").read_text()) from None
                time.sleep(0.2)
        yield url, models
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
        shutil.rmtree(tmp_path / "olah-cache", ignore_errors=True)


def test_seeder_works_against_olah(olah: tuple[str, list[Model]], tmp_path: Path) -> None:
    url, models = olah
    manifest = write_manifest(tmp_path / "manifests", "peer", models)
    store = tmp_path / "models"
    proc = fluxstack("seed", manifest, "--models-dir", store, "--endpoint", url, "--space-margin", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ready"]
    for model in models:
        assert (store / model.dest).stat().st_size == model.size
    state = json.loads((store / ".fluxstack" / "state.json").read_text())["files"]
    assert {d: r["sha256"] for d, r in state.items()} == {m.dest: m.sha256 for m in models}
    big = next(f for f in report["files"] if f["size"] > 64 * MiB)
    assert big["downloaded"] == big["size"]  # Range was ignored: one plain stream, no bytes counted twice
