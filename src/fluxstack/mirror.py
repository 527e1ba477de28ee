"""`fluxstack mirror serve`: a read-only, Hugging Face-compatible server over a seeded store.

A fleet downloads each file from the Hub once, to a cache node; every other host
seeds from it with HF_ENDPOINT=http://cache01:8090. It speaks the subset of the
Hub protocol that huggingface_hub and the seeder use (resolve HEAD/GET with
Range, revision/tree/paths-info APIs, the Hub's error codes), streams with
sendfile (constant memory, files of any size) and never sends Xet headers, so
clients with hf_xet installed still download through it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from fluxstack import __version__
from fluxstack.errors import UsageError
from fluxstack.manifest import COMMIT_RE, ManifestFile
from fluxstack.store import Store

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n"
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class Entry:
    path: str  # in the repo
    disk: Path
    size: int
    sha256: str

    def pointer(self) -> bytes:
        return LFS_POINTER.format(sha=self.sha256, size=self.size).encode()

    def tree_json(self) -> dict[str, Any]:
        # Every file is served as an LFS file; oid is the git blob id of its LFS pointer,
        # exactly what the Hub reports for an LFS file with these bytes.
        pointer = self.pointer()
        blob = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
        return {"type": "file", "oid": blob, "size": self.size, "path": self.path,
                "lfs": {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}}


@dataclass
class RepoView:
    """One revision of one repo, as far as the store holds it."""

    repo: str
    commit: str
    aliases: set[str]
    gated: bool
    files: dict[str, Entry] = field(default_factory=dict)

    def info_json(self) -> dict[str, Any]:
        return {"_id": self.commit[:24], "id": self.repo, "modelId": self.repo, "sha": self.commit,
                "private": False, "disabled": False, "gated": "manual" if self.gated else False,
                "tags": [], "downloads": 0, "likes": 0, "lastModified": "1970-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(self.files)]}

    def tree_json(self, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        out: dict[str, dict[str, Any]] = {}
        for path, entry in sorted(self.files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):
                directory = base + "/".join(parts[:depth])
                if recursive or depth == 1:
                    oid = hashlib.sha1(f"{self.commit}:{directory}".encode()).hexdigest()
                    out.setdefault(directory, {"type": "directory", "oid": oid, "size": 0, "path": directory})
            if recursive or len(parts) == 1:
                out[path] = entry.tree_json()
        return list(out.values())


def synthetic_commit(repo: str, revision: str, files: list[ManifestFile]) -> str:
    """A stable 40-hex id for a branch revision, derived from the exact bytes the mirror serves."""
    rows = sorted(f"{f.path}\0{f.sha256}" for f in files)
    return hashlib.sha1("\n".join([repo, revision, *rows]).encode()).hexdigest()


class MirrorIndex:
    def __init__(self, views: list[RepoView]) -> None:
        self.views = views

    @classmethod
    def build(cls, store: Store, files: list[ManifestFile], warn: Any = print) -> MirrorIndex:
        groups: dict[tuple[str, str], list[ManifestFile]] = {}
        for f in files:
            if f.locked:
                groups.setdefault((f.repo, f.revision), []).append(f)
        views: list[RepoView] = []
        for (repo, revision), group in sorted(groups.items()):
            commit = revision if COMMIT_RE.match(revision) else synthetic_commit(repo, revision, group)
            view = RepoView(repo, commit, {revision, commit}, any(f.gated for f in group))
            for f in group:
                disk = store.final_path(f)
                try:
                    size = disk.stat().st_size
                except OSError:
                    warn(f"mirror: {f.dest} is not in the store; {f.repo}/{f.path} will answer 404")
                    continue
                if size != f.size:
                    warn(f"mirror: {f.dest} has {size} bytes, the manifest says {f.size}; not serving it")
                    continue
                if not os.access(disk, os.R_OK):
                    warn(f"mirror: cannot read {disk} (permissions); not serving it")
                    continue
                view.files[f.path] = Entry(f.path, disk, f.size, f.sha256 or "")
            views.append(view)
        claimed = {alias for v in views for alias in v.aliases}
        for view in views:  # a client asking for the default branch gets the only view of that repo
            if "main" not in claimed and sum(v.repo == view.repo for v in views) == 1:
                view.aliases.add("main")
        return cls(views)

    def resolve(self, repo: str, revision: str) -> RepoView | tuple[int, str, str]:
        candidates = [v for v in self.views if v.repo == repo]
        if not candidates:
            return 404, "RepoNotFound", f"Repository {repo} is not on this mirror."
        for view in candidates:
            if revision in view.aliases:
                return view
        return 404, "RevisionNotFound", f"Revision {revision} of {repo} is not on this mirror."

    def file_count(self) -> int:
        return sum(len(v.files) for v in self.views)


class RateLimiter:
    """A token bucket shared by all connections (bytes per second)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, nbytes: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + nbytes / self.rate
        time.sleep(max(0.0, start - now))


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], index: MirrorIndex, token: str | None,
                 max_rate: int | None, log: Any) -> None:
        super().__init__(address, MirrorHandler)
        self.index = index
        self.token = token
        self.limiter = RateLimiter(max_rate) if max_rate else None
        self.log = log


class MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"fluxstack-mirror/{__version__}"
    server: MirrorServer
    sent = 0

    # -- plumbing ------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per request is written by log_request below, without any header values

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        rng = self.headers.get("Range") if self.headers else None
        extra = f" range={rng}" if rng else ""
        self.server.log(f'mirror: {self.client_address[0]} "{self.command} {self.path}" {code}{extra}')

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               content_type: str = "application/json") -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, headers: dict[str, str] | None = None) -> None:
        self._reply(200, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._reply(status, body, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def _authorized(self, view: RepoView | None) -> bool:
        if self.server.token is None:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode()):
            return True
        if view is not None and view.gated:
            self._error(401, "GatedRepo", f"Access to {view.repo} is restricted: this mirror needs a valid token.")
        else:
            self._error(401, "Unauthorized", "This mirror needs a valid token (Authorization: Bearer ...).")
        return False

    # -- routing -------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        try:
            if parts == ["healthz"]:
                self._json({"status": "ok", "files": self.server.index.file_count()})
            elif len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            elif len(parts) >= 4 and parts[:2] == ["api", "models"]:
                self._api(f"{parts[2]}/{parts[3]}", parts[4:], query)
            else:
                self._error(404, "NotFound", f"{url.path} is not served by this mirror.")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except OSError as exc:  # a store file vanished or became unreadable after start-up
            self.server.log(f"mirror: cannot serve {url.path}: {exc.strerror or exc}")
            self.close_connection = True

    def _view(self, repo: str, revision: str) -> RepoView | None:
        found = self.server.index.resolve(repo, revision)
        if isinstance(found, RepoView):
            return found
        if self._authorized(None):
            self._error(*found)
        return None

    def _api(self, repo: str, rest: list[str], query: dict[str, list[str]]) -> None:
        if not rest and self.command == "GET":
            rest = ["revision", "main"]
        if len(rest) < 2:
            self._error(404, "NotFound", "Unknown API route.")
            return
        kind, revision = rest[0], rest[1]
        view = self._view(repo, revision)
        if view is None or not self._authorized(view):
            return
        if kind == "revision" and self.command == "GET":
            self._json(view.info_json())
        elif kind == "tree" and self.command == "GET":
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            self._json(view.tree_json("/".join(rest[2:]), recursive))
        elif kind == "paths-info" and self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode()) if length else {}
            wanted = form.get("paths", [])
            self._json([view.files[p].tree_json() for p in wanted if p in view.files])
        else:
            self._error(404, "NotFound", "Unknown API route.")

    def _resolve(self, repo: str, revision: str, path: str) -> None:
        view = self._view(repo, revision)
        if view is None or not self._authorized(view):
            return
        entry = view.files.get(path)
        if entry is None:
            self._error(404, "EntryNotFound", f"{path} does not exist in {repo} at {revision}.",
                        {"X-Repo-Commit": view.commit})
            return
        start, end = 0, entry.size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            match = RANGE_RE.match(rng.strip())
            parsed = self._parse_range(match, entry.size) if match else None
            if parsed is None:
                self._error(416, "RangeNotSatisfiable", f"Range {rng} does not fit {entry.size} bytes.",
                            {"Content-Range": f"bytes */{entry.size}"})
                return
            start, end = parsed
            status = 206
        length = end - start + 1 if entry.size else 0
        self.send_response(status)
        etag = f'"{entry.sha256}"'
        self.send_header("X-Repo-Commit", view.commit)
        self.send_header("ETag", etag)
        self.send_header("X-Linked-Etag", etag)
        self.send_header("X-Linked-Size", str(entry.size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Disposition", f'inline; filename="{Path(path).name}"')
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        self.end_headers()
        if self.command == "GET" and length:
            self._send_file(entry.disk, start, length)

    @staticmethod
    def _parse_range(match: re.Match[str], size: int) -> tuple[int, int] | None:
        first, last = match.group(1), match.group(2)
        if first == "" and last == "":
            return None
        if first == "":  # suffix range: the last N bytes
            n = int(last)
            return (max(0, size - n), size - 1) if n > 0 and size else None
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        return (start, end) if start < size and start <= end else None

    def _send_file(self, disk: Path, start: int, length: int) -> None:
        with open(disk, "rb") as fh:
            if self.server.limiter is None:
                self.connection.sendfile(fh, start, length)
                return
            step = 256 * 1024
            offset, end = start, start + length
            while offset < end:
                n = min(step, end - offset)
                self.server.limiter.take(n)
                self.connection.sendfile(fh, offset, n)
                offset += n


def serve(store: Store, files: list[ManifestFile], host: str, port: int, token: str | None,
          max_rate: int | None, ready: Any = None) -> None:
    """Serve until interrupted. ready(server) is called once the socket listens."""
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    index = MirrorIndex.build(store, files, warn=log)
    if not index.file_count():
        raise UsageError(f"nothing to serve in {store.root}: no ready manifest (seed one first) and no "
                         "--manifest whose files are present.")
    try:
        server = MirrorServer((host, port), index, token, max_rate, log)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from None
    repos = len({v.repo for v in index.views})
    log(f"mirror: serving {index.file_count()} files of {repos} repos from {store.root} on "
        f"http://{host}:{server.server_address[1]}{' (token required)' if token else ''}")
    if ready is not None:
        ready(server)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
