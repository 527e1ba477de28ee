"""What goes wrong in the field, done for real: kill -9, wrong bytes, full disks, races, auth, bad endpoints."""

import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, MiB, Upstream, cli_env, fluxstack, make_models, start_mirror, write_manifest, write_random


def seed_args(upstream: Upstream, store: Path, url: str | None = None) -> list[str]:
    return ["seed", str(upstream.manifest), "--models-dir", str(store), "--endpoint", url or upstream.mirror.url,
            "--space-margin", "0"]


def journal_bytes(store: Path) -> int:
    total = 0
    for path in (store / ".fluxstack" / "partial").glob("*.journal.json"):
        with contextlib.suppress(OSError, ValueError):  # a journal being replaced right now
            total += sum(json.loads(path.read_text())["done"])
    return total


def test_sigkill_then_resume_with_range(small_upstream: Upstream, tmp_path: Path) -> None:
    slow = start_mirror(small_upstream.root / "upstream", "--manifest", small_upstream.manifest, "--max-rate", "40MiB")
    store = tmp_path / "models"
    big = next(m for m in small_upstream.models if m.size > 100 * MiB)
    kill_at = random.randint(15, 60) * MiB
    proc = subprocess.Popen([sys.executable, "-m", "fluxstack", *seed_args(small_upstream, store, slow.url)],
                            env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while journal_bytes(store) < kill_at and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    slow.stop()
    on_disk = journal_bytes(store)
    assert 0 < on_disk < big.size, "the kill should land mid-download"
    assert not (store / big.dest).exists()  # nothing half-written under the final name

    again = fluxstack(*seed_args(small_upstream, store), "--json")
    assert again.returncode == 0, again.stderr
    entry = next(f for f in json.loads(again.stdout)["files"] if f["dest"] == big.dest)
    assert entry["resumed_from"] >= on_disk > 0
    assert entry["downloaded"] == big.size - entry["resumed_from"] < big.size
    ranged = [r for r in small_upstream.mirror.requests("model.safetensors") if "range=bytes=" in r]
    assert any(not r.endswith("range=bytes=0-67108863") for r in ranged)
    assert (store / big.dest).read_bytes() == (small_upstream.root / "upstream" / big.dest).read_bytes()


def test_same_size_wrong_bytes_are_quarantined_then_fail_loudly(small_upstream: Upstream, tmp_path: Path) -> None:
    model = next(m for m in small_upstream.models if m.dest.startswith("vae/"))
    write_random(small_upstream.root / "upstream" / model.dest, model.size, seed=999)  # same size, other bytes
    store = tmp_path / "models"
    proc = fluxstack(*seed_args(small_upstream, store), "--json")
    assert proc.returncode == 1
    assert model.sha256 in proc.stderr  # the expected hash
    bad = proc.stderr.split("got ", 1)[1][:64]
    assert len(bad) == 64 and bad != model.sha256
    assert "twice" in proc.stderr and model.dest in proc.stderr
    assert len(list((store / ".fluxstack" / "quarantine").iterdir())) == 2
    assert not (store / model.dest).exists()
    assert not (store / ".fluxstack" / "ready-small.json").exists()
    other = next(m for m in small_upstream.models if m is not model)
    assert (store / other.dest).exists()  # the good file was kept


@pytest.fixture
def small_fs(tmp_path: Path):
    mount = tmp_path / "small-fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_preflight_refuses_before_any_byte_moves(small_upstream: Upstream, small_fs: Path) -> None:
    write_random(small_fs / "filler.bin", 100 * MiB, seed=1)
    proc = fluxstack("seed", small_upstream.manifest, "--models-dir", small_fs / "models", "--endpoint",
                     small_upstream.mirror.url)
    assert proc.returncode == 2
    assert "not enough space" in proc.stderr and "152.0 MiB still to download" in proc.stderr
    assert "margin" in proc.stderr and "free" in proc.stderr
    assert not small_upstream.mirror.requests("resolve")


def test_disk_full_mid_download_keeps_the_partial_and_resumes(small_upstream: Upstream, small_fs: Path) -> None:
    filler = small_fs / "filler.bin"
    write_random(filler, 100 * MiB, seed=1)  # 100 MiB free left, the manifest needs 152 MiB
    store = small_fs / "models"
    args = ["seed", str(small_upstream.manifest), "--models-dir", str(store), "--endpoint",
            small_upstream.mirror.url, "--skip-space-check", "--no-preallocate", "--jobs", "1"]
    proc = fluxstack(*args)
    assert proc.returncode == 2, proc.stderr
    assert "no space left" in proc.stderr and "resumes" in proc.stderr
    big = next(m for m in small_upstream.models if m.size > 100 * MiB)
    assert not (store / big.dest).exists()
    kept = journal_bytes(store)
    assert kept > 50 * MiB

    filler.unlink()
    again = fluxstack(*args, "--json")
    assert again.returncode == 0, again.stderr
    entry = next(f for f in json.loads(again.stdout)["files"] if f["dest"] == big.dest)
    assert entry["resumed_from"] == kept and entry["downloaded"] == big.size - kept
    assert (store / big.dest).read_bytes() == (small_upstream.root / "upstream" / big.dest).read_bytes()


def test_preallocation_turns_a_full_disk_into_an_early_clear_error(small_upstream: Upstream, small_fs: Path) -> None:
    write_random(small_fs / "filler.bin", 100 * MiB, seed=1)
    proc = fluxstack("seed", small_upstream.manifest, "--models-dir", small_fs / "models", "--endpoint",
                     small_upstream.mirror.url, "--skip-space-check", "--jobs", "1")
    assert proc.returncode == 2
    assert "no space left" in proc.stderr
    assert not list((small_fs / "models").glob("diffusion_models/*"))


def test_two_seeders_on_one_store(small_upstream: Upstream, tmp_path: Path) -> None:
    slow = start_mirror(small_upstream.root / "upstream", "--manifest", small_upstream.manifest, "--max-rate", "80MiB")
    store = tmp_path / "models"
    command = [sys.executable, "-m", "fluxstack", *seed_args(small_upstream, store, slow.url), "--json"]
    procs = [subprocess.Popen(command, env=cli_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    slow.stop()
    assert [p.returncode for p in procs] == [0, 0], outs
    reports = [json.loads(out) for out, _ in outs]
    waited = [err for _, err in outs if "waiting for another fluxstack process" in err]
    assert len(waited) == 1
    downloaded = sorted(r["downloaded_bytes"] for r in reports)
    assert downloaded == [0, sum(m.size for m in small_upstream.models)]  # one wrote, the other found it done


def test_gated_repo_messages_and_the_token_never_leaks(tmp_path: Path) -> None:
    secret = "hf_SeCrEtToKeN0123456789"
    models = make_models(tmp_path / "upstream", [("gated-org/model", "w.safetensors", "loras/w.safetensors", MiB)],
                         gated=True)
    manifest = write_manifest(tmp_path / "manifests", "gated", models)
    (tmp_path / "server-token").write_text(secret)
    (tmp_path / "wrong-token").write_text("hf_wrong")
    (tmp_path / "right-token").write_text(secret + "\n")
    mirror = start_mirror(tmp_path / "upstream", "--manifest", manifest, "--token-file", tmp_path / "server-token")
    base = ["seed", str(manifest), "--models-dir", str(tmp_path / "models"), "--endpoint", mirror.url,
            "--space-margin", "0"]
    try:
        none = fluxstack(*base)
        assert none.returncode == 2
        assert "gated" in none.stderr and "https://huggingface.co/gated-org/model" in none.stderr
        assert "--token-file" in none.stderr and "no token was found" in none.stderr

        wrong = fluxstack(*base, "--token-file", tmp_path / "wrong-token")
        assert wrong.returncode == 2 and "was refused" in wrong.stderr and "hf_wrong" not in wrong.stderr

        right = fluxstack(*base, "--token-file", tmp_path / "right-token", "--json")
        assert right.returncode == 0, right.stderr
        from_env = fluxstack(*base, env=cli_env(HF_TOKEN=secret))
        assert from_env.returncode == 0
        assert "token" in right.stderr and mirror.url.split("//")[1] in right.stderr  # the mirror warning
    finally:
        mirror.stop()
    for text in [none.stdout, none.stderr, wrong.stdout, wrong.stderr, right.stdout, right.stderr,
                 from_env.stdout, from_env.stderr, *mirror.log,
                 *(p.read_text(errors="replace") for p in (tmp_path / "models" / ".fluxstack").glob("*.json"))]:
        assert secret not in text


def test_missing_file_is_named(small_upstream: Upstream, tmp_path: Path) -> None:
    doc = small_upstream.manifest.read_text().replace("path: vae.safetensors", "path: not-there.safetensors")
    manifest = tmp_path / "manifests" / "small.yaml"
    manifest.write_text(doc)
    proc = fluxstack("seed", manifest, "--models-dir", tmp_path / "models", "--endpoint", small_upstream.mirror.url,
                     "--space-margin", "0")
    assert proc.returncode == 2
    assert "not-there.safetensors not found in test-org/small (revision main)" in proc.stderr
    assert "small.yaml:" in proc.stderr


def test_unreachable_endpoint_retries_then_names_it(small_upstream: Upstream, tmp_path: Path) -> None:
    proc = fluxstack("seed", small_upstream.manifest, "--models-dir", tmp_path / "models", "--endpoint",
                     "http://127.0.0.1:9", "--retries", "2", "--space-margin", "0")
    assert proc.returncode == 2
    assert "http://127.0.0.1:9" in proc.stderr and "after 2 retries" in proc.stderr
    assert "resume" in proc.stderr


def test_bad_manifest_fails_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "oops.yaml"
    path.write_text("name: oops\ndescription: x\nfiles:\n- repo: a/b\n  revision: main\n  path: x\n")
    proc = fluxstack("seed", path, "--models-dir", tmp_path / "models")
    assert proc.returncode == 2
    assert "oops.yaml:4: files/0" in proc.stderr and "'dest' is a required property" in proc.stderr


def test_unlocked_entry_is_refused_before_anything_happens(tmp_path: Path) -> None:
    proc = fluxstack("seed", "flux-realism-lora", "--models-dir", tmp_path / "models", "--endpoint",
                     "http://127.0.0.1:9")
    assert proc.returncode == 2
    assert "fluxstack manifest lock flux-realism-lora" in proc.stderr
    assert not (tmp_path / "models").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
