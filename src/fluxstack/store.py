"""The model store: layout, the verified-file state, the writer lock and ready markers.

Everything fluxstack keeps beside the models lives in <store>/.fluxstack/ on the same
filesystem, so a verified partial can be renamed into place atomically:

    .fluxstack/lock                 one writer at a time (flock)
    .fluxstack/state.json           dest -> (size, mtime_ns, inode, sha256) of verified files
    .fluxstack/partial/<sha>.part   downloads in progress, never a model extension
    .fluxstack/partial/<sha>.journal.json   which byte ranges of the .part are written
    .fluxstack/quarantine/          files whose bytes did not match, kept for inspection
    .fluxstack/ready-<manifest>.json   written only after every file of the manifest verified
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fluxstack.errors import UsageError
from fluxstack.manifest import Manifest, ManifestFile

MODELS_DIR_ENV = "FLUXSTACK_MODELS_DIR"


def default_models_dir() -> Path:
    return Path(os.environ.get(MODELS_DIR_ENV, "models"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync and rename: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StatKey:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> StatKey:
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta = root / ".fluxstack"
        self.partial_dir = self.meta / "partial"
        self.quarantine_dir = self.meta / "quarantine"
        self.state_path = self.meta / "state.json"
        self.lock_path = self.meta / "lock"

    def create(self) -> None:
        try:
            for d in (self.root, self.meta, self.partial_dir, self.quarantine_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the model store at {self.root}: {exc.strerror}. "
                             "Pass --models-dir to a writable folder.") from None

    def final_path(self, f: ManifestFile) -> Path:
        return self.root / f.dest

    def partial_path(self, f: ManifestFile) -> Path:
        return self.partial_dir / f"{f.sha256}.part"

    def journal_path(self, f: ManifestFile) -> Path:
        return self.partial_dir / f"{f.sha256}.journal.json"

    # -- state of verified files -------------------------------------------------
    def load_state(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # A damaged cache only costs a rehash; it must never block seeding.
            return {}
        return data.get("files", {}) if isinstance(data, dict) else {}

    def save_state(self, files: dict[str, dict[str, Any]]) -> None:
        write_json_atomic(self.state_path, {"version": 1, "files": files})

    @staticmethod
    def state_record(f: ManifestFile, key: StatKey) -> dict[str, Any]:
        return {"size": key.size, "mtime_ns": key.mtime_ns, "inode": key.inode, "sha256": f.sha256,
                "verified_at": datetime.now(UTC).isoformat(timespec="seconds")}

    @staticmethod
    def state_matches(record: dict[str, Any] | None, f: ManifestFile, key: StatKey) -> bool:
        if not record:
            return False
        seen = (record.get("size"), record.get("mtime_ns"), record.get("inode"), record.get("sha256"))
        return seen == (key.size, key.mtime_ns, key.inode, f.sha256)

    # -- ready markers -----------------------------------------------------------
    def ready_path(self, manifest_name: str) -> Path:
        return self.meta / f"ready-{manifest_name}.json"

    def write_ready(self, manifest: Manifest) -> Path:
        path = self.ready_path(manifest.name)
        write_json_atomic(path, {
            "manifest": manifest.name,
            "manifest_digest": manifest.digest(),
            "verified_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "total_bytes": manifest.total_size,
            "files": [f.to_dict() for f in manifest.files],
        })
        return path

    def ready_markers(self) -> dict[str, dict[str, Any]]:
        markers = {}
        for path in sorted(self.meta.glob("ready-*.json")):
            with contextlib.suppress(OSError, ValueError):
                markers[path.stem.removeprefix("ready-")] = json.loads(path.read_text())
        return markers

    def unready(self, dest: str) -> list[str]:
        """Remove the ready marker of every manifest that needs dest; return their names."""
        removed = []
        for name, marker in self.ready_markers().items():
            if any(entry.get("dest") == dest for entry in marker.get("files", [])):
                self.ready_path(name).unlink(missing_ok=True)
                removed.append(name)
        return removed

    # -- quarantine --------------------------------------------------------------
    def quarantine(self, path: Path, f: ManifestFile) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        target = self.quarantine_dir / f"{Path(f.dest).name}.{stamp}.bad"
        os.replace(path, target)
        return target

    # -- writer lock -------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, timeout: float | None, on_wait: Callable[[str], None]) -> Iterator[None]:
        """Hold the store's writer lock; wait for another writer (telling on_wait) up to timeout."""
        self.create()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    if deadline is not None and time.monotonic() >= deadline:
                        raise UsageError(
                            f"another fluxstack process (pid {holder}) is writing to {self.root} "
                            f"(lock {self.lock_path}); waited {timeout:.0f} s. Let it finish, or raise "
                            "--lock-timeout to wait longer.") from None
                    if not told:
                        on_wait(f"waiting for another fluxstack process (pid {holder}) that is writing "
                                f"to {self.root}")
                        told = True
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock
