"""One file's verified, resumable, optionally multi-connection download into a partial.

The partial (<store>/.fluxstack/partial/<sha256>.part) is cut into chunks; a
journal next to it records how many bytes of each chunk are on disk, saved every
half second, so a process killed with SIGKILL resumes with Range requests from
where it stopped. A hasher thread follows the contiguous written prefix (reading
it back from the page cache), so the sha256 is ready when the last byte lands,
and a resumed file's existing prefix is hashed first.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fluxstack.errors import CheckFailed, FluxstackError, UsageError
from fluxstack.http_client import Client
from fluxstack.hub import Source
from fluxstack.manifest import ManifestFile
from fluxstack.store import Store, write_bytes_atomic

CHUNK_SIZE = 64 << 20
BUFFER_SIZE = 8 << 20
JOURNAL_EVERY_S = 0.5
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Options:
    connections: int = 4      # per file, for files of more than one chunk
    retries: int = 5          # per request, with exponential backoff
    timeout: float = 60.0     # socket timeout, seconds
    preallocate: bool = True  # reserve the whole file up front: no ENOSPC half way


@dataclass
class Result:
    sha256: str
    downloaded: int   # bytes that crossed the network in this run
    resumed_from: int  # bytes already on disk when this run started
    range_requests: int


class RangeUnsupported(Exception):
    """The server answered a Range request with the whole file."""


class NoSpace(UsageError):
    pass


class NetworkError(UsageError):
    pass


def no_space(path: Path) -> NoSpace:
    return NoSpace(
        f"no space left on the device holding {path.parent}; the partial download is kept and the next "
        "run resumes it. Free space (or `fluxstack gc`) and run the same command again.")


class Journal:
    def __init__(self, size: int, chunk_size: int, done: list[int]) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.done = done
        self.lock = threading.Lock()

    @classmethod
    def fresh(cls, size: int) -> Journal:
        count = max(1, -(-size // CHUNK_SIZE))
        return cls(size, CHUNK_SIZE, [0] * count)

    @classmethod
    def load(cls, path: Path, partial: Path, size: int) -> Journal | None:
        try:
            data = json.loads(path.read_text())
            journal = cls(int(data["size"]), int(data["chunk_size"]), [int(x) for x in data["done"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if journal.size != size or len(journal.done) != max(1, -(-size // journal.chunk_size)):
            return None
        if not partial.exists():
            return None
        on_disk = partial.stat().st_size
        # Never trust the journal for bytes the file cannot hold (a truncated partial).
        for i, n in enumerate(journal.done):
            journal.done[i] = max(0, min(n, journal.chunk_len(i), on_disk - i * journal.chunk_size))
        return journal

    def render(self) -> bytes:
        # Fixed-width numbers: the journal never changes length, so it can be rewritten in place
        # when the disk is full (see save).
        with self.lock:
            done = ",".join(f"{n:>20d}" for n in self.done)
        return f'{{"size": {self.size}, "chunk_size": {self.chunk_size}, "done": [{done}]}}\n'.encode()

    def save(self, path: Path, data: bytes | None = None) -> None:
        data = data if data is not None else self.render()
        try:
            write_bytes_atomic(path, data)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # No room for a new file: overwrite the existing one, same length, same blocks.
            fd = os.open(path, os.O_WRONLY)
            try:
                if os.fstat(fd).st_size != len(data):
                    raise
                os.pwrite(fd, data, 0)
            finally:
                os.close(fd)

    def chunk_len(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def written(self) -> int:
        with self.lock:
            return sum(self.done)

    def prefix(self) -> int:
        """Bytes from offset 0 that are all on disk."""
        with self.lock:
            total = 0
            for i, n in enumerate(self.done):
                total += n
                if n < self.chunk_len(i):
                    break
            return total


class PrefixHasher(threading.Thread):
    """sha256 of the partial, following the contiguous written prefix as it grows."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True, name="fluxstack-hash")
        self.fd = fd
        self.sha = hashlib.sha256()
        self.pos = 0
        self.limit = 0
        self.closed = False
        self.cond = threading.Condition()
        self.error: BaseException | None = None

    def advance(self, limit: int) -> None:
        with self.cond:
            if limit > self.limit:
                self.limit = limit
                self.cond.notify()

    def run(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.pos >= self.limit and not self.closed:
                        self.cond.wait()
                    if self.pos >= self.limit:
                        return
                    limit = self.limit
                while self.pos < limit:
                    data = os.pread(self.fd, min(BUFFER_SIZE, limit - self.pos), self.pos)
                    if not data:
                        raise OSError(errno.EIO, "partial file shorter than its journal")
                    self.sha.update(data)
                    self.pos += len(data)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self.error = exc

    def finish(self) -> str:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.join()
        if self.error is not None:
            raise self.error
        return self.sha.hexdigest()


class Transfer:
    """Downloads one manifest file into its partial; publish is the caller's job."""

    def __init__(self, source: Source, store: Store, f: ManifestFile, options: Options,
                 on_bytes: Callable[[int], None]) -> None:
        assert f.size is not None and f.sha256 is not None
        self.source = source
        self.f = f
        self.size = f.size
        self.options = options
        self.on_bytes = on_bytes
        self.partial = store.partial_path(f)
        self.journal_path = store.journal_path(f)
        self.url = source.url(f)
        self.downloaded = 0
        self.range_requests = 0
        self.counter_lock = threading.Lock()
        self.stop = threading.Event()

    # -- setup -----------------------------------------------------------------------
    def _open(self) -> tuple[int, Journal]:
        journal = Journal.load(self.journal_path, self.partial, self.size)
        if journal is None:
            self.partial.unlink(missing_ok=True)
            journal = Journal.fresh(self.size)
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self.options.preallocate and self.size:
                os.posix_fallocate(fd, 0, self.size)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.ENOSPC:
                raise no_space(self.partial) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            fd = os.open(self.partial, os.O_RDWR)
        journal.save(self.journal_path)
        return fd, journal

    # -- the run ---------------------------------------------------------------------
    def run(self) -> Result:
        fd, journal = self._open()
        resumed_from = journal.written()
        try:
            try:
                digest = self._download(fd, journal, ranged=True)
            except RangeUnsupported:
                # The server ignores Range: start over with one plain stream.
                journal = Journal(self.size, max(self.size, 1), [0])
                digest = self._download(fd, journal, ranged=False)
            os.fsync(fd)
        finally:
            os.close(fd)
        return Result(digest, self.downloaded, resumed_from, self.range_requests)

    def _download(self, fd: int, journal: Journal, ranged: bool) -> str:
        hasher = PrefixHasher(fd)
        hasher.start()
        hasher.advance(journal.prefix())
        pending = [i for i, n in enumerate(journal.done) if n < journal.chunk_len(i)]
        pending_lock = threading.Lock()
        errors: list[BaseException] = []
        self.stop.clear()

        def worker() -> None:
            client = Client(self.options.timeout)
            try:
                while not self.stop.is_set():
                    with pending_lock:
                        if not pending:
                            return
                        index = pending.pop(0)
                    self._fetch_chunk(client, fd, journal, index, hasher, ranged)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(exc)
                self.stop.set()
            finally:
                client.close()

        count = max(1, min(self.options.connections, len(pending))) if ranged else 1
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(count)]
        for t in threads:
            t.start()
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(JOURNAL_EVERY_S)
            # Flush what the snapshot covers, then record it: the journal never claims bytes a power
            # cut could lose, and the final fsync finds little left to write (disk and network overlap).
            snapshot = journal.render()
            os.fdatasync(fd)
            journal.save(self.journal_path, snapshot)
        if errors:
            hasher.finish()
            unsupported = [e for e in errors if isinstance(e, RangeUnsupported)]
            raise unsupported[0] if unsupported else errors[0]
        hasher.advance(self.size)
        return hasher.finish()

    def _fetch_chunk(self, client: Client, fd: int, journal: Journal, index: int,
                     hasher: PrefixHasher, ranged: bool) -> None:
        start = index * journal.chunk_size
        end = start + journal.chunk_len(index)  # exclusive
        attempt = 0
        while True:
            with journal.lock:
                offset = start + journal.done[index]
            if offset >= end or self.stop.is_set():
                return
            try:
                self._stream(client, fd, journal, index, offset, end, hasher, ranged)
                return
            except FluxstackError:
                raise
            except RangeUnsupported:
                raise
            except (OSError, http.client.HTTPException, _Retryable) as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise no_space(self.partial) from None
                attempt += 1
                if attempt > self.options.retries:
                    raise NetworkError(
                        f"downloading {self.f.path} from {self.source.endpoint} failed after "
                        f"{self.options.retries} retries: {_describe(exc)}. Check the network or the "
                        "endpoint (--endpoint / HF_ENDPOINT); run the command again to resume.") from None
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))

    def _stream(self, client: Client, fd: int, journal: Journal, index: int, offset: int, end: int,
                hasher: PrefixHasher, ranged: bool) -> None:
        headers = self.source.headers()
        if ranged:
            headers["Range"] = f"bytes={offset}-{end - 1}"
            if offset > 0:
                with self.counter_lock:
                    self.range_requests += 1
        response, final_url = client.get(self.url, headers)
        status = response.status
        if status in RETRYABLE_STATUS:
            response.read()
            raise _Retryable(f"HTTP {status}")
        if status == 416:
            response.read()
            raise _Retryable("HTTP 416 (range not satisfiable): the file on the server changed size")
        if status >= 400:
            response.read()
            raise self.source.http_error(status, {k.lower(): v for k, v in response.getheaders()}, self.f)
        total = _reported_total(response)
        if total is not None and total != self.size:
            client.discard(final_url)
            raise CheckFailed(
                f"{self.source.endpoint} serves {self.f.path} of {self.f.repo} with {total} bytes, but the "
                f"manifest ({self.f.source}) says {self.size}: the manifest is out of date (run `fluxstack "
                "manifest lock`) or the endpoint holds another file.")
        if ranged and status == 200 and (offset > 0 or end < self.size):
            client.discard(final_url)
            raise RangeUnsupported()
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        pos = offset
        try:
            while pos < end:
                n = response.readinto(view[: min(BUFFER_SIZE, end - pos)])
                if not n:
                    raise _Retryable(f"connection closed after {pos} of {self.size} bytes")
                written = 0
                while written < n:
                    written += os.pwrite(fd, view[written:n], pos + written)
                pos += n
                with journal.lock:
                    journal.done[index] = pos - index * journal.chunk_size
                with self.counter_lock:
                    self.downloaded += n
                self.on_bytes(n)
                hasher.advance(journal.prefix())
                if self.stop.is_set():
                    client.discard(final_url)
                    return
        except BaseException:
            client.discard(final_url)
            raise
        if not response.isclosed() and response.length:
            client.discard(final_url)  # the server sent more than asked: do not reuse the stream


class _Retryable(Exception):
    pass


def _reported_total(response: http.client.HTTPResponse) -> int | None:
    """The whole file's size as the server states it (Content-Range total, else Content-Length of a 200)."""
    content_range = response.getheader("Content-Range")
    if response.status == 206 and content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    length = response.getheader("Content-Length")
    return int(length) if response.status == 200 and length and length.isdigit() else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
