"""sha256 of whole files, streamed with a reused buffer (hashlib releases the GIL, so threads scale)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

BUFFER_SIZE = 8 << 20


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    sha = hashlib.sha256()
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            sha.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return sha.hexdigest()
