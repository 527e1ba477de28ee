"""Read safetensors files onto a device with several threads, in the background.

A cold start reads about 20 GB (the prepared transformer, T5-XXL) from the page cache, and Python
spends seconds importing diffusers and transformers before it needs any of it: reading them on a
background thread meanwhile took 4-5 s off a warm start on the H100 (docs/performance.md). Every
byte arrives by os.preadv into the destination tensor (CPU), or into a pinned staging buffer that is
copied to the GPU on a side stream; both release the GIL, once per 64 MiB range rather than once per
tensor, so the reader leaves the interpreter to the imports. Float tensors can be converted on
arrival (T5 is stored in fp16 and computed in bf16), one at a time, so no second copy of a file
is ever held.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 64 << 20  # bytes per read; with two staging buffers per thread, 128 MiB of pinned memory each
THREADS = 4  # one thread copies 5-6 GB/s out of the page cache; PCIe 4/5 takes 25-50 GB/s
MAX_HEADER = 100 << 20  # safetensors' own limit
MAX_PIECES = 512  # buffers per os.preadv call; Linux takes at most 1024 (IOV_MAX)

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class DamagedFile(ValueError):
    """The file is not a complete safetensors file (truncated, or its header does not describe it)."""


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    size: int


def entries(path: Path) -> list[Entry]:
    """The tensors a safetensors file holds, in file order, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedFile(f"{path} is {size} bytes, too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER or 8 + length > size:
            raise DamagedFile(f"{path}: its header claims {length} bytes and the file has {size}")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise DamagedFile(f"{path}: its header is not JSON ({exc})") from exc
    import torch

    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DamagedFile(f"{path}: tensor {name!r} has an unreadable header entry {info!r}") from exc
        numel = 1
        for n in shape:
            numel *= n
        if end - begin != numel * getattr(torch, dtype).itemsize or begin < 0 or 8 + length + end > size:
            raise DamagedFile(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}, bytes {begin}..{end}) "
                              f"does not fit the file's {size} bytes; the file is truncated or damaged")
        out.append(Entry(name, dtype, shape, 8 + length + begin, end - begin))
    return sorted(out, key=lambda e: e.start)


def _byte_view(t: Any) -> Any:
    import torch

    return t.reshape(-1).view(torch.uint8)


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise DamagedFile(f"{path} ended at byte {offset + done} while reading; the file is truncated")
        done += n


def _chunks(items: list[Entry], chunk: int) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
    """Contiguous file ranges of at most `chunk` bytes (a larger tensor is split), each with the
    pieces it holds, back to back: (entry index, offset in the tensor, offset in the range, length)."""
    out: list[tuple[int, int, list[tuple[int, int, int, int]]]] = []
    for i, e in enumerate(items):
        done = 0
        while done < e.size:
            pos = e.start + done
            if not out or pos - out[-1][0] >= chunk or pos != out[-1][1] or len(out[-1][2]) >= MAX_PIECES:
                out.append((pos, pos, []))
            begin, _, pieces = out[-1]
            n = min(e.size - done, chunk - (pos - begin))
            pieces.append((i, done, pos - begin, n))
            out[-1] = (begin, pos + n, pieces)
            done += n
    return out


def read(path: Path, device: str, dtype: str | None = None, threads: int = THREADS,
         chunk: int = CHUNK) -> dict[str, Any]:
    """Every tensor of a safetensors file, on `device` ("cpu" or "cuda"), as safetensors.torch.load_file
    returns them; with `dtype` (a torch dtype's name) the 16/32/64-bit float tensors are converted to it,
    one at a time, so a GPU never holds a second copy of the file. Raises DamagedFile for a truncated
    or malformed file, OSError when it cannot be read."""
    import torch

    items = entries(path)
    tensors = [torch.empty(e.shape, dtype=getattr(torch, e.dtype), device=device) for e in items]
    views = [_byte_view(t) for t in tensors]
    ranges = _chunks(items, chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        worker = _read_to_cpu if torch.device(device).type == "cpu" else _read_to_gpu
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="weights-read") as pool:
            for f in [pool.submit(worker, fd, path, views, ranges[i::threads], chunk) for i in range(threads)]:
                f.result()
    finally:
        os.close(fd)
    out = {e.name: t for e, t in zip(items, tensors, strict=True)}
    if dtype is not None:
        floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        views.clear()  # each original is freed as its converted copy replaces it: one extra tensor at a time
        tensors.clear()
        for name in out:
            if out[name].dtype in floats:
                out[name] = out[name].to(getattr(torch, dtype))
    return out


def _read_to_cpu(fd: int, path: Path, views: list[Any], ranges: list, chunk: int) -> None:
    # One system call per range, straight into the tensors: the GIL is released and taken back once per
    # range, not once per tensor (a reader that keeps asking for the GIL slows the imports it overlaps).
    for begin, end, pieces in ranges:
        buffers = [memoryview(views[i].numpy())[in_tensor:in_tensor + n] for i, in_tensor, _, n in pieces]
        if os.preadv(fd, buffers, begin) != end - begin:  # only at the end of a truncated file
            for buffer, (_, _, in_range, _) in zip(buffers, pieces, strict=True):
                _pread_into(fd, buffer, begin + in_range, path)


def _read_to_gpu(fd: int, path: Path, views: list[Any], ranges: list, chunk: int) -> None:
    import torch

    if not ranges:
        return
    # Two buffers: the next range is read while the last one is still being copied to the GPU.
    staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied: list[Any] = [None, None]
    stream = torch.cuda.Stream()
    for k, (begin, end, pieces) in enumerate(ranges):
        buf = staging[k % 2]
        if copied[k % 2] is not None:
            copied[k % 2].synchronize()
        _pread_into(fd, memoryview(buf.numpy())[:end - begin], begin, path)
        with torch.cuda.stream(stream):
            # One call for all the range's pieces (the GIL is released once, as for the read).
            torch._foreach_copy_([views[i][in_tensor:in_tensor + n] for i, in_tensor, _, n in pieces],
                                 [buf[in_range:in_range + n] for _, _, in_range, n in pieces], non_blocking=True)
            copied[k % 2] = torch.cuda.Event()
            copied[k % 2].record(stream)
    stream.synchronize()


class Prefetch:
    """Files read by read() (path, device, dtype) on one background thread, in the order given, while the
    caller goes on. take() waits for a file's tensors; a read that failed raises its error there."""

    def __init__(self, jobs: list[tuple[Path, str, str | None]], threads: int = THREADS) -> None:
        work = [(path, device, dtype, Future()) for path, device, dtype in jobs]
        self._futures: dict[Path, Future] = {path: future for path, _, _, future in work}
        self.done: dict[str, str] = {}  # file name -> how much was read by when, for /readyz
        threading.Thread(target=self._run, args=(work, threads), name="weights-prefetch", daemon=True).start()

    def _run(self, work: list[tuple[Path, str, str | None, Future]], threads: int) -> None:
        started = time.monotonic()
        for path, device, dtype, future in work:
            try:
                tensors = read(path, device, dtype, threads)
                self.done[path.name] = (f"{path.stat().st_size / 2**30:.1f} GiB to {device} by "
                                        f"{time.monotonic() - started:.1f} s")
                future.set_result(tensors)
                del tensors
            except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the file
                future.set_exception(exc)

    def __contains__(self, path: Path) -> bool:
        return path in self._futures

    def take(self, path: Path) -> dict[str, Any]:
        """The tensors of `path` (waiting for them); the prefetch lets go of them."""
        return self._futures.pop(path).result()
