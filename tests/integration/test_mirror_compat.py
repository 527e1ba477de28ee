"""huggingface_hub itself, unmodified, downloads from `fluxstack mirror serve` (HF_ENDPOINT set for real)."""

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from helpers import Upstream, cli_env

CLIENT = r"""
import json, sys
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
out = {}
cache = sys.argv[1]
out["single"] = hf_hub_download("test-org/encoders", "tokenizer/vocab.json", cache_dir=cache)
out["snapshot"] = snapshot_download("test-org/encoders", cache_dir=cache)
info = HfApi().get_paths_info("test-org/tiny-flux", ["ae.safetensors"], revision="main")[0]
out["paths_info"] = {"sha256": info.lfs.sha256, "size": info.lfs.size}
try:
    hf_hub_download("test-org/encoders", "no/such/file.bin", cache_dir=cache)
except EntryNotFoundError:
    out["missing_file"] = "EntryNotFoundError"
try:
    hf_hub_download("test-org/nope", "x.bin", cache_dir=cache)
except RepositoryNotFoundError:
    out["missing_repo"] = "RepositoryNotFoundError"
print(json.dumps(out))
"""


def test_hf_hub_download_and_snapshot_download_work_against_the_mirror(upstream: Upstream, tmp_path: Path) -> None:
    env = cli_env(HF_ENDPOINT=upstream.mirror.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0")
    proc = subprocess.run([sys.executable, "-c", CLIENT, str(tmp_path / "cache")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    models = {m.path: m for m in upstream.models if m.repo == "test-org/encoders"}
    vocab = upstream.root / "store" / models["tokenizer/vocab.json"].dest
    assert Path(out["single"]).read_bytes() == vocab.read_bytes()
    snapshot = Path(out["snapshot"])
    for path, model in models.items():
        assert (snapshot / path).read_bytes() == (upstream.root / "store" / model.dest).read_bytes()
    ae = next(m for m in upstream.models if m.path == "ae.safetensors")
    assert out["paths_info"] == {"sha256": ae.sha256, "size": ae.size}
    assert out["missing_file"] == "EntryNotFoundError"
    assert out["missing_repo"] == "RepositoryNotFoundError"


def head(url: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def test_resolve_headers_follow_the_hub_protocol(upstream: Upstream) -> None:
    ae = next(m for m in upstream.models if m.path == "ae.safetensors")
    status, headers = head(f"{upstream.mirror.url}/test-org/tiny-flux/resolve/main/ae.safetensors")
    assert status == 200
    assert len(headers["X-Repo-Commit"]) == 40
    assert headers["ETag"] == f'"{ae.sha256}"'
    assert headers["X-Linked-Size"] == str(ae.size)
    assert not any(k.lower().startswith("x-xet") for k in headers)  # Xet would bypass the mirror
    request = urllib.request.Request(f"{upstream.mirror.url}/test-org/tiny-flux/resolve/main/ae.safetensors",
                                     headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 10-19/{ae.size}"
        assert response.read() == (upstream.root / "store" / ae.dest).read_bytes()[10:20]
    status, headers = head(f"{upstream.mirror.url}/test-org/tiny-flux/resolve/main/missing.bin")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert "X-Repo-Commit" in headers
    request = urllib.request.Request(f"{upstream.mirror.url}/test-org/tiny-flux/resolve/main/ae.safetensors",
                                     headers={"Range": f"bytes={ae.size + 5}-"})
    try:
        urllib.request.urlopen(request)
        raise AssertionError("expected 416")
    except urllib.error.HTTPError as err:
        assert err.code == 416
        assert err.headers["Content-Range"] == f"bytes */{ae.size}"
