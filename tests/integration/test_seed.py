"""Seeding from our mirror over real HTTP: bytes, state, ready marker, no-op re-seed, verify, dry run."""

import json
import os
from pathlib import Path

from helpers import Upstream, fluxstack


def seed(upstream: Upstream, store: Path, *extra: str):
    return fluxstack("seed", upstream.manifest, "--models-dir", store, "--endpoint", upstream.mirror.url,
                     "--space-margin", "0", "--json", *extra)


def test_seed_downloads_verifies_and_marks_ready(upstream: Upstream, tmp_path: Path) -> None:
    store = tmp_path / "models"
    proc = seed(upstream, store)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ready"] is True
    assert {f["status"] for f in report["files"]} == {"downloaded"}
    for model in upstream.models:
        assert (store / model.dest).read_bytes() == (upstream.root / "store" / model.dest).read_bytes()
    big = next(f for f in report["files"] if f["dest"].startswith("diffusion_models/"))
    assert big["range_requests"] >= 3  # the 1 GiB file came over several ranges at once
    marker = json.loads((store / ".fluxstack" / "ready-tiny-flux.json").read_text())
    assert {f["dest"]: f["sha256"] for f in marker["files"]} == {m.dest: m.sha256 for m in upstream.models}
    state = json.loads((store / ".fluxstack" / "state.json").read_text())["files"]
    assert set(state) == {m.dest for m in upstream.models}
    assert not any((store / ".fluxstack" / "partial").iterdir())
    assert "ready, 5 files" in proc.stderr

    # Nothing changed: nothing is read or fetched.
    before = len(upstream.mirror.requests())
    again = seed(upstream, store)
    assert again.returncode == 0
    assert {f["status"] for f in json.loads(again.stdout)["files"]} == {"cached"}
    assert len(upstream.mirror.requests()) == before

    # A file changed behind our back (same size): found, quarantined, fetched again.
    victim = store / "vae/ae-tiny.safetensors"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(data)
    repaired = seed(upstream, store)
    assert repaired.returncode == 0, repaired.stderr
    statuses = {f["dest"]: f["status"] for f in json.loads(repaired.stdout)["files"]}
    assert statuses["vae/ae-tiny.safetensors"] == "downloaded"
    assert "BAD" in repaired.stderr
    assert victim.read_bytes() == (upstream.root / "store/vae/ae-tiny.safetensors").read_bytes()
    assert any((store / ".fluxstack" / "quarantine").iterdir())


def test_verify_full_finds_corruption_the_stat_cache_cannot_see(upstream: Upstream, tmp_path: Path) -> None:
    store = tmp_path / "models"
    assert seed(upstream, store).returncode == 0
    assert fluxstack("seed", upstream.manifest, "--models-dir", store, "--verify").returncode == 0

    victim = store / "text_encoders/clip-tiny.safetensors"
    st = victim.stat()
    with open(victim, "r+b") as fh:  # flip one byte, keep size, inode and mtime
        fh.seek(12345)
        byte = fh.read(1)
        fh.seek(12345)
        fh.write(bytes([byte[0] ^ 1]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))

    quick = fluxstack("seed", upstream.manifest, "--models-dir", store, "--verify")
    assert quick.returncode == 0  # the cache trusts (size, mtime, inode): this is what --full is for
    full = fluxstack("seed", upstream.manifest, "--models-dir", store, "--verify", "--full", "--json")
    assert full.returncode == 1
    files = {f["dest"]: f for f in json.loads(full.stdout)["files"]}
    assert files["text_encoders/clip-tiny.safetensors"]["status"] == "bad"
    assert files["diffusion_models/flux1-tiny.safetensors"]["status"] == "verified"
    assert not (store / ".fluxstack" / "ready-tiny-flux.json").exists()
    assert victim.exists()  # verify reports; it does not move files


def test_verify_reports_missing_files(upstream: Upstream, tmp_path: Path) -> None:
    proc = fluxstack("seed", upstream.manifest, "--models-dir", tmp_path / "empty", "--verify")
    assert proc.returncode == 1
    assert "missing" in proc.stderr and "NOT ready" in proc.stderr


def test_dry_run_plans_without_writing(upstream: Upstream, tmp_path: Path) -> None:
    store = tmp_path / "models"
    proc = fluxstack("seed", upstream.manifest, "--models-dir", store, "--endpoint", upstream.mirror.url,
                     "--dry-run", "--space-margin", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["needed_bytes"] == sum(m.size for m in upstream.models)
    assert {f["status"] for f in report["files"]} == {"planned"}
    assert not store.exists()
