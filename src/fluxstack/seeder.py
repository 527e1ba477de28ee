"""`fluxstack seed`: bring a store to exactly the bytes a manifest names, or say why not.

Order of work: take the store lock; classify every file (cached in the state file,
present but unknown -> rehash, missing -> download); check free space before any
byte moves; download in parallel into partials; verify the sha256; publish by
rename; write the ready marker only when every file verified.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fluxstack.download import Journal, Options, Transfer, no_space
from fluxstack.errors import CheckFailed, FluxstackError, UsageError
from fluxstack.hashing import sha256_file
from fluxstack.hub import Source
from fluxstack.manifest import Manifest, ManifestFile
from fluxstack.progress import Reporter
from fluxstack.store import StatKey, Store, fsync_dir
from fluxstack.units import human_size


@dataclass(frozen=True)
class SeedOptions:
    jobs: int = 4
    download: Options = field(default_factory=Options)
    dry_run: bool = False
    verify: bool = False       # check only, download nothing
    full: bool = False         # rehash every file, ignoring the state cache
    space_margin: int = 1 << 30
    skip_space_check: bool = False
    lock_timeout: float | None = None


@dataclass
class Outcome:
    dest: str
    size: int
    status: str  # cached | verified | downloaded | missing | bad | failed | planned | skipped
    downloaded: int = 0
    resumed_from: int = 0
    range_requests: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Report:
    manifest: str
    store: str
    endpoint: str
    outcomes: list[Outcome]
    ready: bool = False
    seconds: float = 0.0
    needed_bytes: int = 0
    free_bytes: int = 0
    error: FluxstackError | None = None

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return self.error.exit_code
        return 0 if all(o.status in ("cached", "verified", "downloaded", "planned") for o in self.outcomes) else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest, "store": self.store, "endpoint": self.endpoint, "ready": self.ready,
            "seconds": round(self.seconds, 3), "needed_bytes": self.needed_bytes, "free_bytes": self.free_bytes,
            "downloaded_bytes": sum(o.downloaded for o in self.outcomes), "exit_code": self.exit_code,
            "error": str(self.error) if self.error else None, "files": [asdict(o) for o in self.outcomes],
        }


def refuse_unlocked(manifest: Manifest) -> None:
    missing = manifest.unlocked()
    if missing:
        names = "\n  ".join(f"{f.dest} ({f.source})" for f in missing)
        raise UsageError(
            f"manifest {manifest.name} has entries without a sha256 or size, so their bytes cannot be "
            f"verified:\n  {names}\nRun `fluxstack manifest lock {manifest.name}` where the Hub (or a "
            "mirror holding these files) is reachable, review the diff, and seed again.")


def storage_error(exc: OSError, where: Path) -> FluxstackError:
    if exc.errno == errno.ENOSPC:
        return no_space(where)
    return UsageError(f"cannot write to {exc.filename or where}: {exc.strerror or exc}. Make the store writable "
                      "(or pick another --models-dir) and run again; verified files and partials are kept.")


def allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


class Seeder:
    def __init__(self, manifest: Manifest, store: Store, source: Source, options: SeedOptions,
                 reporter: Reporter) -> None:
        self.manifest = manifest
        self.store = store
        self.source = source
        self.options = options
        self.reporter = reporter
        self.state: dict[str, dict[str, Any]] = {}
        self.state_lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> Report:
        refuse_unlocked(self.manifest)
        started = time.monotonic()
        report = Report(self.manifest.name, str(self.store.root), self.source.endpoint, [])
        if self.options.dry_run:
            self._plan(report)
        else:
            with self.store.locked(self.options.lock_timeout, self.reporter.info):
                try:
                    self._seed(report)
                except FluxstackError as exc:
                    report.error = exc
                except OSError as exc:
                    report.error = storage_error(exc, self.store.root)
        report.seconds = time.monotonic() - started
        return report

    # -- classification --------------------------------------------------------------
    def _classify(self) -> tuple[list[ManifestFile], list[ManifestFile], list[ManifestFile], list[ManifestFile]]:
        """(cached, to_hash, missing, wrong_size)."""
        cached, to_hash, missing, wrong_size = [], [], [], []
        for f in self.manifest.files:
            path = self.store.final_path(f)
            try:
                key = StatKey.of(path)
            except FileNotFoundError:
                missing.append(f)
                continue
            if key.size != f.size:
                wrong_size.append(f)
            elif not self.options.full and Store.state_matches(self.state.get(f.dest), f, key):
                cached.append(f)
            else:
                to_hash.append(f)
        return cached, to_hash, missing, wrong_size

    def _plan(self, report: Report) -> None:
        self.state = self.store.load_state()
        cached, to_hash, missing, wrong_size = self._classify()
        for f in cached:
            report.outcomes.append(Outcome(f.dest, f.size or 0, "cached", detail="verified earlier"))
        for f in to_hash:
            report.outcomes.append(Outcome(f.dest, f.size or 0, "planned", detail="hash and record"))
        for f in missing + wrong_size:
            on_disk = Journal.load(self.store.journal_path(f), self.store.partial_path(f), f.size or 0)
            have = on_disk.written() if on_disk else 0
            what = f"download {human_size((f.size or 0) - have)}" + (f", resume at {human_size(have)}" if have else "")
            report.outcomes.append(Outcome(f.dest, f.size or 0, "planned", resumed_from=have, detail=what))
        self._preflight(report, missing + wrong_size, enforce=False)

    def _seed(self, report: Report) -> None:
        self.store.create()
        self.state = self.store.load_state()
        cached, to_hash, missing, wrong_size = self._classify()
        outcomes = {f.dest: Outcome(f.dest, f.size or 0, "cached") for f in cached}

        for f, digest in self._hash_all(to_hash):
            if digest == f.sha256:
                self._record(f)
                outcomes[f.dest] = Outcome(f.dest, f.size or 0, "verified", detail="hashed")
            else:
                outcomes[f.dest] = self._found_bad(f, f"sha256 {digest}, expected {f.sha256}")
                if not self.options.verify:
                    missing.append(f)
        for f in wrong_size:
            size = self.store.final_path(f).stat().st_size
            outcomes[f.dest] = self._found_bad(f, f"{size} bytes, expected {f.size}")
            if not self.options.verify:
                missing.append(f)

        if self.options.verify:
            for f in missing:
                outcomes.setdefault(f.dest, Outcome(f.dest, f.size or 0, "missing", detail="not in the store"))
                self.store.unready(f.dest)
        elif missing:
            self.store.ready_path(self.manifest.name).unlink(missing_ok=True)
            self._preflight(report, missing, enforce=not self.options.skip_space_check)
            warning = self.source.mirror_warning()
            if warning:
                self.reporter.info(warning)
            outcomes.update(self._download_all(missing, report))

        report.outcomes = [outcomes[f.dest] for f in self.manifest.files]
        with self.state_lock:
            self.store.save_state(self.state)
        if report.error is None and report.exit_code == 0:
            self.store.write_ready(self.manifest)
            report.ready = True
        else:
            self.store.ready_path(self.manifest.name).unlink(missing_ok=True)

    def _found_bad(self, f: ManifestFile, why: str) -> Outcome:
        path = self.store.final_path(f)
        with self.state_lock:
            self.state.pop(f.dest, None)
        unready = self.store.unready(f.dest)
        detail = why
        if not self.options.verify:
            moved = self.store.quarantine(path, f)
            detail += f"; moved to {moved}"
        if unready:
            detail += f"; not ready any more: {', '.join(unready)}"
        self.reporter.info(f"{f.dest}: BAD ({detail})")
        return Outcome(f.dest, f.size or 0, "bad", detail=detail)

    def _record(self, f: ManifestFile) -> None:
        key = StatKey.of(self.store.final_path(f))
        with self.state_lock:
            self.state[f.dest] = Store.state_record(f, key)

    def _hash_all(self, files: list[ManifestFile]) -> list[tuple[ManifestFile, str]]:
        if not files:
            return []
        workers = max(1, min(self.options.jobs, os.cpu_count() or 1, len(files)))
        self.reporter.info(f"hashing {len(files)} file(s), {human_size(sum(f.size or 0 for f in files))}")
        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(lambda f: sha256_file(self.store.final_path(f)), files))
        return list(zip(files, digests, strict=True))

    # -- space -----------------------------------------------------------------------
    def _preflight(self, report: Report, files: list[ManifestFile], enforce: bool) -> None:
        needed = sum(max(0, (f.size or 0) - allocated(self.store.partial_path(f))) for f in files)
        probe = self.store.root if self.store.root.exists() else self.store.root.parent
        free = shutil.disk_usage(probe).free
        report.needed_bytes, report.free_bytes = needed, free
        margin = self.options.space_margin
        if needed + margin > free:
            message = (f"not enough space in {self.store.root}: {human_size(needed)} still to download "
                       f"+ {human_size(margin)} margin, {human_size(free)} free. Free "
                       f"{human_size(needed + margin - free)} (`fluxstack gc` removes stale files), or seed "
                       "onto a bigger disk with --models-dir.")
            if enforce:
                raise UsageError(message)
            self.reporter.info(message)
        elif files:
            self.reporter.info(f"{human_size(needed)} to download, {human_size(free)} free")

    # -- downloads -------------------------------------------------------------------
    def _download_all(self, files: list[ManifestFile], report: Report) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        errors: list[FluxstackError] = []

        def one(f: ManifestFile) -> None:
            if self.stop.is_set():
                outcomes[f.dest] = Outcome(f.dest, f.size or 0, "skipped", detail="stopped after an error")
                return
            try:
                outcomes[f.dest] = self._fetch_verified(f)
            except (FluxstackError, OSError) as exc:
                error = exc if isinstance(exc, FluxstackError) else storage_error(exc, self.store.final_path(f))
                outcomes[f.dest] = Outcome(f.dest, f.size or 0, "failed", detail=str(error))
                errors.append(error)
                self.stop.set()

        with ThreadPoolExecutor(max(1, min(self.options.jobs, len(files)))) as pool:
            list(pool.map(one, sorted(files, key=lambda f: -(f.size or 0))))
        if errors:
            report.error = min(errors, key=lambda e: e.exit_code)  # a failed check outranks the rest
        return outcomes

    def _fetch_verified(self, f: ManifestFile) -> Outcome:
        started = time.monotonic()
        downloaded = range_requests = 0
        resumed_from: int | None = None
        bad_digests: list[str] = []
        for _ in range(2):  # a mismatch is retried once from scratch
            transfer = Transfer(self.source, self.store, f, self.options.download,
                                lambda n: self.reporter.advance(f.dest, n))
            partial_journal = Journal.load(self.store.journal_path(f), self.store.partial_path(f), f.size or 0)
            have = partial_journal.written() if partial_journal else 0
            self.reporter.start_file(f.dest, f.size or 0, have)
            result = transfer.run()
            downloaded += result.downloaded
            range_requests += result.range_requests
            resumed_from = result.resumed_from if resumed_from is None else resumed_from
            if result.sha256 == f.sha256:
                self._publish(f)
                seconds = time.monotonic() - started
                rate = f", {human_size(downloaded / max(seconds, 1e-6))}/s" if downloaded else ""
                done = f"verified, {human_size(downloaded)} downloaded in {seconds:.1f} s{rate}"
                self.reporter.end_file(f.dest, done)
                return Outcome(f.dest, f.size or 0, "downloaded", downloaded, resumed_from, range_requests, seconds)
            bad_digests.append(result.sha256)
            moved = self.store.quarantine(self.store.partial_path(f), f)
            self.store.journal_path(f).unlink(missing_ok=True)
            self.reporter.end_file(f.dest, f"sha256 mismatch (got {result.sha256}); moved to {moved}; retrying once")
        raise CheckFailed(
            f"{f.dest}: the bytes from {self.source.endpoint} do not match the manifest, twice. Expected sha256 "
            f"{f.sha256}, got {bad_digests[0]} then {bad_digests[1]}. Both copies are in "
            f"{self.store.quarantine_dir}. The endpoint serves a different file than {f.source} names: fix the "
            "mirror, or re-lock the manifest if the file changed upstream.")

    def _publish(self, f: ManifestFile) -> None:
        final = self.store.final_path(f)
        partial = self.store.partial_path(f)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(partial, 0o644)
        os.replace(partial, final)
        fsync_dir(final.parent)
        self.store.journal_path(f).unlink(missing_ok=True)
        self._record(f)
        with self.state_lock:
            self.store.save_state(self.state)
