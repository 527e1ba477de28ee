"""The parallel safetensors reader (runtime/weights_read.py) on the CPU: the same tensors as safetensors'
own loader, split across threads and chunks, and clear errors for damaged files. The GPU path (pinned
staging, copies on a side stream) runs in bench/gpu/cold_start.py and tests/gpu; its speed is measured there."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the runtime extra is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="the runtime extra is not installed")

from fluxstack.runtime import weights_read  # noqa: E402


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(37, 29, generator=g),
        "b.bf16": torch.randn(5, 3, 7, generator=g).to(torch.bfloat16),
        "c.fp8": torch.randn(64, 33, generator=g).to(torch.float8_e4m3fn),
        "d.half": torch.randn(11, generator=g).half(),
        "e.scale": torch.tensor(3.25),  # 0-dimensional
        "f.ids": torch.arange(13, dtype=torch.int64),
        "g.mask": torch.rand(9, generator=g) > 0.5,
        "h.empty": torch.empty(0, 4),
    }


@pytest.mark.parametrize(("threads", "chunk"), [(1, 1 << 20), (3, 7), (4, 100)])
def test_reads_what_safetensors_reads(tmp_path: Path, threads: int, chunk: int) -> None:
    """Chunks of 7 bytes split every tensor across ranges read by different threads."""
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file(mixed_tensors(), str(path))
    expected = safetensors_torch.load_file(str(path))
    got = weights_read.read(path, "cpu", threads=threads, chunk=chunk)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_prefetch_hands_over_each_file_once_and_its_error_where_it_is_taken(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    safetensors_torch.save_file(mixed_tensors(), str(good))
    bad.write_bytes(good.read_bytes()[:-40])  # lost its last bytes
    prefetch = weights_read.Prefetch([(bad, "cpu", None), (good, "cpu", "bfloat16")], threads=2)
    assert good in prefetch and bad in prefetch
    got, want = prefetch.take(good), mixed_tensors()
    # floats converted to the dtype asked for (T5 is stored in fp16 and computed in bf16); the rest as stored
    assert torch.equal(got["a.weight"], want["a.weight"].to(torch.bfloat16))
    assert torch.equal(got["d.half"], want["d.half"].to(torch.bfloat16))
    assert got["c.fp8"].dtype == torch.float8_e4m3fn and torch.equal(got["f.ids"], want["f.ids"])
    assert good not in prefetch  # handed over: the prefetch keeps no reference to 20 GB of weights
    assert prefetch.done["good.safetensors"].startswith("0.0 GiB to cpu by ")  # what /readyz shows
    with pytest.raises(weights_read.DamagedFile, match="truncated or damaged"):
        prefetch.take(bad)


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(b"\x01\x02"), "too short to be a safetensors file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"), "header claims"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), "header is not JSON"),
    (lambda p: write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
     r"'w' \(F32 \[4\], bytes 0..16\) does not fit"),
    (lambda p: write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16),
     "does not fit"),
    (lambda p: write_raw(p, {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2),
     "unreadable header entry"),
])
def test_a_damaged_file_is_named_with_what_is_wrong(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "w.safetensors"
    make(path)  # type: ignore[operator]
    with pytest.raises(weights_read.DamagedFile, match=message) as caught:
        weights_read.read(path, "cpu")
    assert str(path) in str(caught.value)


def test_a_file_that_shrinks_while_being_read_is_reported_truncated(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The header was checked against the size, then the file lost its end (another process rewrote it)."""
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file(mixed_tensors(), str(path))
    checked = weights_read.entries(path)
    path.write_bytes(path.read_bytes()[:-100])
    monkeypatch.setattr(weights_read, "entries", lambda _p: checked)
    with pytest.raises(weights_read.DamagedFile, match=r"ended at byte \d+ while reading; the file is truncated"):
        weights_read.read(path, "cpu", threads=2, chunk=64)


@pytest.mark.parametrize(("args", "env", "words"), [
    (["--read-threads", "-1"], {}, "argument --read-threads: must be 0 or more, got -1"),
    ([], {"FLUXSTACK_READ_THREADS": "four"}, "argument --read-threads: invalid _non_negative value: 'four'"),
])
def test_the_runtime_refuses_a_bad_thread_count_with_exit_2(tmp_path: Path, args: list[str], env: dict[str, str],
                                                            words: str) -> None:
    from helpers import cli_env, fluxstack

    result = fluxstack("runtime", "serve", "--models-dir", tmp_path, *args, env={**cli_env(), **env})
    assert result.returncode == 2 and words in result.stderr
