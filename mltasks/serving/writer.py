"""A worker's answer writes, overlapped with its next batch.

A solo worker that writes its answers itself waits for PostgreSQL (the answer statement)
and Redis (the cache write) on every batch, while the next batch waits in its queue: a
third of its time under load (py-spy, docs/PERFORMANCE.md). The task hands the write to
this thread and returns; Celery gives it the next batch while the thread sends the answers,
and the two overlap (the thread waits with the GIL released).

One thread per process (made after the fork), writing in the order batches were answered.
At most ``depth`` writes wait behind the one in progress: past that, ``submit`` blocks the
task as its own write would have, so answers never pile up in memory. A worker that dies
with writes pending leaves their rows ``processing``: the bridge's rescue and the lease
answer them 255, as for a worker that dies holding a batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

Job = Callable[[], object]


class Writer:
    """A single background thread running write jobs in order, with a bounded backlog."""

    def __init__(self, depth: int = 1, name: str = "mltasks-answers") -> None:
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.depth = depth
        self.name = name
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._busy = False  # a job is running
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = 0

    def submit(self, job: Job) -> None:
        """Run ``job`` after the earlier ones; blocks while ``depth`` jobs already wait."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the writer is closed")
            self._ensure_thread()
            while len(self._jobs) >= self.depth:
                self._cond.wait()
            self._jobs.append(job)
            self._cond.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted job has run; False if ``timeout_s`` passed first."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while self._jobs or self._busy:
                left = end - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return not (self._jobs or self._busy)
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> bool:
        """Run what is pending (for at most ``timeout_s``), then stop the thread."""
        done = self.drain(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(max(0.0, timeout_s))
        if not done:
            log.error(
                "%d answer writes still pending at shutdown: their rows are left to the lease",
                len(self._jobs) + int(self._busy),
                extra={"event": "answer_writes_abandoned"},
            )
        return done

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._pid != pid:
            # A forked child inherits the parent's object, not its thread nor its jobs.
            self._jobs.clear()
            self._busy = False
            self._thread = None
            self._pid = pid
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return  # closed, and nothing left
                job = self._jobs.popleft()
                self._busy = True
                self._cond.notify_all()  # room for the next submit
            try:
                job()
            except Exception:  # a job handles its own errors; this keeps the thread alive
                log.exception("an answer write failed", extra={"event": "answer_write_crashed"})
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
