"""Progress and messages: rich bars on a terminal, plain lines otherwise, nothing on stdout.

stdout is reserved for machine output (--json); everything human goes to stderr.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fluxstack.units import human_size

PLAIN_EVERY_S = 5.0


class Reporter(Protocol):
    def info(self, message: str) -> None: ...
    def start_file(self, name: str, total: int, done: int) -> None: ...
    def advance(self, name: str, nbytes: int) -> None: ...
    def end_file(self, name: str, message: str) -> None: ...
    def close(self) -> None: ...


class PlainReporter:
    """One line per event, and a progress line per file at most every few seconds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, list[float]] = {}  # name -> [total, done, started, last_print, start_done]

    def info(self, message: str) -> None:
        print(f"fluxstack: {message}", file=sys.stderr, flush=True)

    def start_file(self, name: str, total: int, done: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.files[name] = [total, done, now, now, done]
        resumed = f", resuming at {human_size(done)}" if done else ""
        self.info(f"downloading {name} ({human_size(total)}{resumed})")

    def advance(self, name: str, nbytes: int) -> None:
        with self.lock:
            row = self.files[name]
            row[1] += nbytes
            now = time.monotonic()
            if now - row[3] < PLAIN_EVERY_S:
                return
            row[3] = now
            total, done, started, _, start_done = row
        rate = (done - start_done) / max(now - started, 1e-6)
        eta = (total - done) / rate if rate else 0
        self.info(f"{name}: {done / max(total, 1):.0%} of {human_size(total)}, "
                  f"{human_size(rate)}/s, {eta:.0f} s left")

    def end_file(self, name: str, message: str) -> None:
        self.info(f"{name}: {message}")

    def close(self) -> None:
        pass


class RichReporter:
    """Bars per file and for the total, with bytes/s and ETA."""

    def __init__(self, total: int) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
        self.tasks: dict[str, TaskID] = {}
        self.total = self.progress.add_task("total", total=total)
        self.progress.start()

    def info(self, message: str) -> None:
        self.progress.console.print(f"fluxstack: {message}", markup=False, highlight=False)

    def start_file(self, name: str, total: int, done: int) -> None:
        self.tasks[name] = self.progress.add_task(name, total=total, completed=done)
        self.progress.advance(self.total, done)

    def advance(self, name: str, nbytes: int) -> None:
        self.progress.advance(self.tasks[name], nbytes)
        self.progress.advance(self.total, nbytes)

    def end_file(self, name: str, message: str) -> None:
        if name in self.tasks:
            self.progress.remove_task(self.tasks.pop(name))
        self.info(f"{name}: {message}")

    def close(self) -> None:
        self.progress.stop()


def make_reporter(total: int, json_mode: bool) -> Reporter:
    if sys.stderr.isatty() and not json_mode:
        return RichReporter(total)
    return PlainReporter()
