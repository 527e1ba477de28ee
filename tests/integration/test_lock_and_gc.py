"""`manifest lock` against a real endpoint, and `gc` on a real store."""

import json
from pathlib import Path

import yaml

from helpers import Upstream, fluxstack


def test_lock_fills_hashes_sizes_and_commits_without_downloading(small_upstream: Upstream, tmp_path: Path) -> None:
    doc = yaml.safe_load(small_upstream.manifest.read_text())
    for entry in doc["files"]:
        entry["sha256"] = None
        entry["size"] = None
    path = tmp_path / "locked" / "small.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(doc, sort_keys=False))

    check = fluxstack("manifest", "lock", path, "--endpoint", small_upstream.mirror.url, "--check")
    assert check.returncode == 1 and "not written" in check.stdout
    assert yaml.safe_load(path.read_text())["files"][0]["sha256"] is None

    done = fluxstack("manifest", "lock", path, "--endpoint", small_upstream.mirror.url)
    assert done.returncode == 0, done.stderr
    locked = {e["dest"]: e for e in yaml.safe_load(path.read_text())["files"]}
    for model in small_upstream.models:
        entry = locked[model.dest]
        assert (entry["sha256"], entry["size"]) == (model.sha256, model.size)
        assert len(entry["revision"]) == 40
    assert not small_upstream.mirror.requests("/resolve/")  # metadata only, no weight bytes

    again = fluxstack("manifest", "lock", path, "--endpoint", small_upstream.mirror.url, "--check")
    assert again.returncode == 0 and "already locked" in again.stdout
    seeded = fluxstack("seed", path, "--models-dir", tmp_path / "models", "--endpoint", small_upstream.mirror.url,
                       "--space-margin", "0")
    assert seeded.returncode == 0, seeded.stderr  # the mirror serves the pinned commit


def test_lock_names_a_missing_path(small_upstream: Upstream, tmp_path: Path) -> None:
    doc = yaml.safe_load(small_upstream.manifest.read_text())
    doc["files"][0]["path"] = "gone.safetensors"
    path = tmp_path / "m" / "small.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = fluxstack("manifest", "lock", path, "--endpoint", small_upstream.mirror.url)
    assert proc.returncode == 2 and "gone.safetensors does not exist in test-org/small" in proc.stderr


def test_gc_removes_only_what_fluxstack_owns_and_nobody_needs(small_upstream: Upstream, tmp_path: Path) -> None:
    store = tmp_path / "models"
    assert fluxstack("seed", small_upstream.manifest, "--models-dir", store, "--endpoint",
                     small_upstream.mirror.url, "--space-margin", "0").returncode == 0
    mine = store / "loras" / "my-own.safetensors"
    mine.parent.mkdir()
    mine.write_bytes(b"user data")
    stale = store / ".fluxstack" / "partial" / ("f" * 64 + ".part")
    stale.write_bytes(b"x" * 1000)
    (store / ".fluxstack" / "quarantine" / "old.bad").write_bytes(b"bad")

    kept = fluxstack("gc", "--models-dir", store, "--json")
    assert kept.returncode == 0
    plan = json.loads(kept.stdout)
    assert plan["in_use"] == ["small"]
    assert {Path(r["path"]).name for r in plan["remove"]} == {stale.name, "old.bad"}
    assert str(mine) in plan["unmanaged"]
    assert all((store / m.dest).exists() for m in small_upstream.models)

    (store / ".fluxstack" / "ready-small.json").unlink()  # nothing uses these models any more
    dry = fluxstack("gc", "--models-dir", store, "--dry-run", "--json")
    assert {r["path"] for r in json.loads(dry.stdout)["remove"]} >= {str(store / m.dest) for m in small_upstream.models}
    assert all((store / m.dest).exists() for m in small_upstream.models)

    real = fluxstack("gc", "--models-dir", store)
    assert real.returncode == 0 and "removed" in real.stderr
    assert not any((store / m.dest).exists() for m in small_upstream.models)
    assert mine.read_bytes() == b"user data"
    assert json.loads((store / ".fluxstack" / "state.json").read_text())["files"] == {}


def test_gc_refuses_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    proc = fluxstack("gc", "--models-dir", tmp_path)
    assert proc.returncode == 2 and "not a fluxstack store" in proc.stderr
