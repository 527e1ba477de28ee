"""One GPU worker and a bounded queue in front of it.

A full queue is refused at once (429 + Retry-After) instead of piling up requests the GPU
cannot serve; a request that waited longer than its timeout is dropped before it runs (503).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fluxstack.runtime.engine import Engine, Job


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class WaitedTooLong(Exception):
    pass


@dataclass
class Ticket:
    job: Job
    enqueued: float
    timeout: float
    future: Future[list[bytes]] = field(default_factory=Future)


class Worker:
    def __init__(self, engine: Engine, queue_size: int, timeout: float, metrics: Any) -> None:
        self.engine = engine
        self.queue: queue.Queue[Ticket] = queue.Queue(maxsize=queue_size)
        self.timeout = timeout
        self.metrics = metrics
        self.last_seconds = 10.0  # for Retry-After until a real duration is known
        self.thread = threading.Thread(target=self._run, name="fluxstack-gpu", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> Future[list[bytes]]:
        ticket = Ticket(job, time.monotonic(), self.timeout)
        try:
            self.queue.put_nowait(ticket)
        except queue.Full:
            raise QueueFull(max(1, round(self.last_seconds * self.queue.qsize()))) from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return ticket.future

    def _run(self) -> None:
        try:
            self.engine.load()
        except Exception:  # noqa: BLE001 - the error is on engine.load_error for /readyz; keep answering
            return
        while True:
            ticket = self.queue.get()
            self.metrics.queue_depth.set(self.queue.qsize())
            waited = time.monotonic() - ticket.enqueued
            if waited > ticket.timeout:
                ticket.future.set_exception(WaitedTooLong(
                    f"the request waited {waited:.0f} s in the queue, longer than its {ticket.timeout:.0f} s "
                    "timeout; the service is overloaded, retry later"))
                continue
            if not ticket.future.set_running_or_notify_cancel():
                continue
            started = time.monotonic()
            try:
                images = self.engine.generate(ticket.job)
            except BaseException as exc:  # noqa: BLE001 - handed to the request that caused it
                ticket.future.set_exception(exc)
            else:
                self.last_seconds = time.monotonic() - started
                self.metrics.images.inc(len(images))
                ticket.future.set_result(images)
