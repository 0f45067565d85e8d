"""The background writer: one ordered in-memory queue, one thread, one transaction per batch.

Callers never block and never see database errors. A failed commit (locked, disk full, connection
lost) keeps the batch at the head of the queue and is retried with backoff; one error is logged per
outage. Rows are dropped only beyond `max_pending_rows` (oldest first, counted as `lost`), or when the
database rejects one row for good (an integrity error: that row alone, also counted as `lost`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from core.errors import describe
from core.settings import StorageSettings
from storage.writes import ROW_KINDS, Op

log = logging.getLogger("classmood.storage")

BATCH_TRIGGER = 500        # this many queued operations commit at once instead of waiting flush_seconds
MAX_BATCH = 10_000         # one transaction stays short even while a long outage's backlog drains
BACKOFF_START, BACKOFF_MAX = 0.1, 5.0


def _rejected_for_good(exc: BaseException) -> bool:
    """True for a row the database (or our row building) will never accept; False for outages worth retrying."""
    if isinstance(exc, (IntegrityError, DataError)):
        return True
    return not isinstance(exc, (SQLAlchemyError, OSError))   # TypeError/ValueError from a malformed record


class BatchWriter:
    def __init__(self, engine: Engine, apply: Callable[[Connection, list[Op]], int],
                 flush_seconds: float = StorageSettings.flush_seconds,
                 max_pending_rows: int = StorageSettings.max_pending_rows, name: str = "classmood-db-writer") -> None:
        self.engine = engine
        self.apply = apply
        self.flush_seconds = max(0.0, float(flush_seconds))
        self.max_pending_rows = max(1, int(max_pending_rows))
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)   # queue changes, commits, flush requests, close
        self._stop = threading.Event()                 # cuts a retry backoff short on close
        self._ops: deque[Op] = deque()                 # accepted, not yet taken by the writer
        self._batch: list[Op] = []                     # taken by the writer, commit in progress
        self._seq = 0
        self._flush_waiters = 0
        self._closed = False
        self._dropping = False                         # inside an overflow episode (log once)
        self._stats: dict[str, Any] = {"accepted": 0, "accepted_samples": 0, "written": 0, "written_samples": 0,
                                       "lost": 0, "write_errors": 0, "last_error": None}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- producer side (any thread, never blocks on the database) ------------------------------------
    def put(self, kind: str, payload: Any) -> bool:
        with self._lock:
            if self._closed:
                if kind in ROW_KINDS:
                    self._stats["lost"] += 1
                log.error("storage is closed: a %s write was refused", kind)
                return False
            self._seq += 1
            self._ops.append(Op(self._seq, kind, payload))
            self._stats["accepted"] += 1
            if kind == "sample":
                self._stats["accepted_samples"] += 1
            if len(self._ops) + len(self._batch) > self.max_pending_rows:
                self._drop_oldest_rows()
            if len(self._ops) == 1 or len(self._ops) > BATCH_TRIGGER:
                self._cond.notify_all()
            return True

    def _drop_oldest_rows(self) -> None:
        """Under the lock: bring the backlog back to max_pending_rows by dropping the oldest data rows.

        Only rows not in flight can go (the writer may be committing its batch right now); bookkeeping
        operations (participants, session end, acks) are kept because later rows depend on them.
        """
        excess = len(self._ops) + len(self._batch) - self.max_pending_rows
        i = 0
        while excess > 0 and i < len(self._ops):
            if self._ops[i].kind in ROW_KINDS:
                del self._ops[i]
                self._stats["lost"] += 1
                excess -= 1
            else:
                i += 1
        if not self._dropping:
            self._dropping = True
            log.error("storage: %d rows waiting for the database (max_pending_rows=%d): dropping the oldest; "
                      "%d lost so far", len(self._ops) + len(self._batch), self.max_pending_rows, self._stats["lost"])

    # ---- writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        last_commit = 0.0
        backoff = BACKOFF_START
        failing = False
        while True:
            with self._lock:
                while True:
                    if not self._ops:
                        if self._closed:
                            return
                        self._cond.wait()
                        continue
                    wait = last_commit + self.flush_seconds - time.monotonic()
                    if wait <= 0 or self._closed or self._flush_waiters or len(self._ops) > BATCH_TRIGGER:
                        break
                    self._cond.wait(wait)
                n = min(len(self._ops), MAX_BATCH)
                self._batch = [self._ops.popleft() for _ in range(n)]
                batch = self._batch
            done, n_samples, rejected, error = self._write(batch)
            last_commit = time.monotonic()
            with self._lock:
                self._batch = []
                self._stats["written"] += done - len(rejected)
                self._stats["written_samples"] += n_samples
                self._stats["lost"] += len(rejected)
                if rejected:
                    self._stats["last_error"] = describe(rejected[-1][1])
                if error is not None:
                    self._ops.extendleft(reversed(batch[done:]))   # back at the head, order kept
                    self._stats["write_errors"] += 1
                    self._stats["last_error"] = describe(error)
                    if len(self._ops) > self.max_pending_rows:
                        self._drop_oldest_rows()
                elif not self._ops:
                    self._dropping = False
                pending = len(self._ops)
                # Logged before waking flush(): whoever sees the backlog gone also sees why rows went
                # missing and that the database recovered.
                for op, exc in rejected:
                    log.error("storage: the database rejected a %s row for good (%s); dropped",
                              op.kind, describe(exc))
                if error is None and failing:
                    log.warning("storage: database writable again; backlog is %d operations", pending)
                self._cond.notify_all()
            if error is None:
                failing, backoff = False, BACKOFF_START
                continue
            if not failing:
                log.error("storage: database write failed (%s); keeping %d operations in memory and retrying",
                          describe(error), pending)
                failing = True
            if self._stop.is_set():
                return                     # closing: close() counts what is left as lost
            self._stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _write(self, batch: list[Op]) -> tuple[int, int, list[tuple[Op, BaseException]], BaseException | None]:
        """Commit `batch`; returns (operations done, samples written, rejected rows, retryable error)."""
        try:
            with self.engine.begin() as conn:
                return len(batch), self.apply(conn, batch), [], None
        except Exception as exc:
            if not _rejected_for_good(exc):
                return 0, 0, [], exc
        # Some row is refused for good: find it one operation at a time so the rest still lands.
        rejected: list[tuple[Op, BaseException]] = []
        n_samples = 0
        for i, op in enumerate(batch):
            try:
                with self.engine.begin() as conn:
                    n_samples += self.apply(conn, [op])
            except Exception as exc:
                if not _rejected_for_good(exc):
                    return i, n_samples, rejected, exc
                rejected.append((op, exc))
        return len(batch), n_samples, rejected, None

    # ---- control ------------------------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Block until every operation accepted before this call is committed (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._seq
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while True:
                    head = self._batch[0] if self._batch else (self._ops[0] if self._ops else None)
                    if head is None or head.seq > target:
                        return True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(remaining)
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float = 10.0) -> bool:
        """Flush, then stop the thread. Idempotent. Returns False if rows had to be abandoned."""
        with self._lock:
            if self._closed:
                return True
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        self._thread.join(timeout=max(1.0, timeout))
        with self._lock:
            left = [*self._batch, *self._ops]
            self._ops.clear()
            self._batch = []
            lost_rows = sum(1 for op in left if op.kind in ROW_KINDS)
            self._stats["lost"] += lost_rows
        if left:
            log.error("storage: closing with %d operations (%d rows) the database did not take; they are lost",
                      len(left), lost_rows)
        return not left

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._stats, "pending": len(self._ops) + len(self._batch)}
