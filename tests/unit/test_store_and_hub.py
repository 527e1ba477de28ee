import os
import threading
import time
from pathlib import Path

import pytest

from fluxstack.errors import UsageError
from fluxstack.hub import Source, Token, resolve_endpoint, resolve_token
from fluxstack.manifest import ManifestFile, load_manifest
from fluxstack.store import StatKey, Store
from fluxstack.units import parse_size

F = ManifestFile("org/repo", "main", "a.safetensors", "vae/a.safetensors", 3, "a" * 64, True, "mit", "m.yaml:4")


def test_state_record_matches_until_the_file_changes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    path = tmp_path / F.dest
    path.parent.mkdir(parents=True)
    path.write_bytes(b"abc")
    record = Store.state_record(F, StatKey.of(path))
    assert Store.state_matches(record, F, StatKey.of(path))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000))
    assert not Store.state_matches(record, F, StatKey.of(path))
    other = ManifestFile(**{**F.to_dict(), "sha256": "b" * 64})
    assert not Store.state_matches(Store.state_record(F, StatKey.of(path)), other, StatKey.of(path))
    store.create()
    store.save_state({F.dest: record})
    assert store.load_state() == {F.dest: record}


def test_a_damaged_state_file_only_costs_a_rehash(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.create()
    store.state_path.write_text("{not json")
    assert store.load_state() == {}


def test_unready_removes_only_markers_that_need_the_file(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.create()
    store.write_ready(load_manifest("flux-dev"))
    store.write_ready(load_manifest("flux-kontext-dev-fp8"))
    removed = store.unready("diffusion_models/flux1-dev.safetensors")
    assert removed == ["flux-dev"]
    assert not store.ready_path("flux-dev").exists()
    assert store.ready_path("flux-kontext-dev-fp8").exists()


def test_second_writer_waits_then_times_out_with_the_holder(tmp_path: Path) -> None:
    store = Store(tmp_path)
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with store.locked(None, print):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    told: list[str] = []
    with pytest.raises(UsageError, match=rf"pid {os.getpid()}.*--lock-timeout"), store.locked(0.5, told.append):
        pass
    assert told and "waiting for another fluxstack process" in told[0]
    release.set()
    t.join()
    with store.locked(0.5, told.append):
        pass


def test_token_never_shows_in_repr_or_str() -> None:
    token = Token("hf_secretvalue123", "HF_TOKEN")
    assert "hf_secretvalue123" not in repr(token)
    assert "hf_secretvalue123" not in str(token)
    assert token.header() == {"Authorization": "Bearer hf_secretvalue123"}


def test_token_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    assert resolve_token(None) is None or resolve_token(None).source.startswith("secret")
    path_file = tmp_path / "path-token"
    path_file.write_text("from-path\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(path_file))
    assert resolve_token(None).value == "from-path"
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert resolve_token(None).value == "from-env"
    flag_file = tmp_path / "flag-token"
    flag_file.write_text("from-flag")
    assert resolve_token(flag_file).value == "from-flag"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        resolve_token(empty)
    with pytest.raises(UsageError, match="cannot read the token file"):
        resolve_token(tmp_path / "missing")


def test_endpoint_must_be_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert resolve_endpoint(None) == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com/")
    assert resolve_endpoint(None) == "https://hf-mirror.com"
    with pytest.raises(UsageError, match="not an http"):
        resolve_endpoint("hf-mirror.com")


def test_mirror_warning_names_the_host_that_gets_the_token() -> None:
    assert Source("https://huggingface.co", Token("x", "HF_TOKEN")).mirror_warning() is None
    warning = Source("https://hf-mirror.com", Token("secret", "HF_TOKEN")).mirror_warning()
    assert warning and "hf-mirror.com" in warning and "token" in warning and "secret" not in warning


def test_gated_refusal_tells_how_to_get_access() -> None:
    message = str(Source("https://huggingface.co", None).http_error(401, {"x-error-code": "GatedRepo"}, F))
    assert "gated" in message and "https://huggingface.co/org/repo" in message and "--token-file" in message
    assert "no token was found" in message
    message = str(Source("https://huggingface.co", Token("s3cr3t", "HF_TOKEN")).http_error(403, {}, F))
    assert "HF_TOKEN was refused" in message and "s3cr3t" not in message


def test_missing_file_names_repo_revision_path_and_manifest_line() -> None:
    message = str(Source("http://m:8090", None).http_error(404, {"x-error-code": "EntryNotFound"}, F))
    assert "a.safetensors" in message and "org/repo" in message and "main" in message and "m.yaml:4" in message


@pytest.mark.parametrize(("text", "value"), [("1000", 1000), ("512MiB", 512 << 20), ("2G", 2 << 30),
                                             ("1.5KiB", 1536), ("0", 0)])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_bad_size_is_explained() -> None:
    with pytest.raises(ValueError, match="examples"):
        parse_size("lots")
