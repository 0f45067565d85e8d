"""Latest-frame-wins slots, one per student track, drained in one batch by the inference thread.

Why not a queue: when inference falls behind, an old frame is worthless; replacing it keeps memory
bounded (one frame per student) and latency low, and the drop is counted.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)   # whose frames (the bot: (room_id, participant_id))
T = TypeVar("T")                   # what is waiting (the bot: a PendingFrame)


class FrameMailbox(Generic[K, T]):
    def __init__(self, per_key: int = 1) -> None:
        self.per_key = max(1, per_key)
        self._slots: dict[K, deque[T]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self.accepted = 0
        self.dropped = 0

    def put(self, key: K, item: T) -> None:
        """Never blocks; drops the oldest pending item of this key when its slot is full."""
        with self._lock:
            slot = self._slots.setdefault(key, deque())
            if len(slot) >= self.per_key:
                slot.popleft()
                self.dropped += 1
            slot.append(item)
            self.accepted += 1
            self._ready.notify()

    def discard(self, key: K) -> None:
        """Forget a student's pending frames (left, opted out): they must not be analysed."""
        with self._lock:
            self._slots.pop(key, None)

    def take_all(self, max_items: int, timeout: float) -> list[tuple[K, T]]:
        """Wait up to `timeout` for anything pending, then take up to max_items, oldest keys first."""
        with self._lock:
            if not any(self._slots.values()):
                self._ready.wait(timeout)
            taken: list[tuple[K, T]] = []
            for key in list(self._slots):
                slot = self._slots[key]
                while slot and len(taken) < max_items:
                    taken.append((key, slot.popleft()))
                if not slot:
                    del self._slots[key]
                if len(taken) >= max_items:
                    break
            return taken

    def wake(self) -> None:
        with self._lock:
            self._ready.notify_all()

    def pending(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._slots.values())
