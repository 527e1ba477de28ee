"""PNG encoding in parallel strips, for the speed modes.

Pillow compresses an image on one core: a 1024x1024 FLUX image took 0.18-0.25 s on the H100 host, more
than the VAE decode and the text encoders together (docs/performance.md). Here the rows are filtered
with numpy ("Up": each row minus the one above, which smooth images compress well) and deflated in
strips on several threads (zlib releases the GIL), each strip ending on a byte boundary so that the
strips join into one valid zlib stream, as pigz does. Any PNG reader decodes the result.
"""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

SIGNATURE = b"\x89PNG\r\n\x1a\n"
STRIP_ROWS = 128  # 1024 rows -> 8 strips; smaller strips compress worse for little more speed
UP = 2  # PNG filter type


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=8, thread_name_prefix="png")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text_chunk(key: str, value: str) -> bytes:
    """tEXt where the value is Latin-1 (what Pillow writes), else uncompressed UTF-8 iTXt."""
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def _deflate(data: bytes, last: bool, level: int) -> bytes:
    # Raw deflate (no zlib header): the strips are concatenated under one header written by encode().
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def encode(pixels: Any, text: dict[str, str], level: int = 1) -> bytes:
    """An 8-bit RGB PNG of `pixels` (height x width x 3 uint8 numpy array) with `text` as text chunks."""
    import numpy as np

    height, width, channels = pixels.shape
    if pixels.dtype != np.uint8 or channels != 3:
        raise ValueError(f"expected height x width x 3 uint8 pixels, got {pixels.shape} {pixels.dtype}")
    rows = np.empty((height, 1 + width * 3), dtype=np.uint8)
    rows[:, 0] = UP
    flat = pixels.reshape(height, width * 3)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's filter
    raw = rows.tobytes()
    stride = rows.shape[1] * STRIP_ROWS
    strips = [raw[i:i + stride] for i in range(0, len(raw), stride)]
    parts = _pool().map(lambda s: _deflate(s[1], s[0] == len(strips) - 1, level), enumerate(strips))
    idat = b"\x78\x01" + b"".join(parts) + struct.pack(">I", zlib.adler32(raw))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return (SIGNATURE + _chunk(b"IHDR", header) + b"".join(_text_chunk(k, v) for k, v in text.items())
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
