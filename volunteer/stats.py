"""Contribution counters, measured where the work happens.

hivemind runs every expert's forward and backward in the Runtime thread of the volunteer's main
process (connection handlers only relay tensors), so plain counters guarded by a lock, updated by
``serving.CountingBackend``, see every sample that is really computed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ExpertStats:
    uid: str
    expert_type: str
    forward_batches: int = 0
    forward_samples: int = 0
    backward_batches: int = 0
    backward_samples: int = 0
    optimizer_steps: int = 0  # lifetime, restored from the checkpoint
    busy_seconds: float = 0.0
    last_request: float | None = None  # unix time

    def to_dict(self) -> dict:
        return asdict(self)


class ExpertCounters:
    """Mutable counters of one expert; ``snapshot()`` gives the frozen view that renderers use."""

    def __init__(self, uid: str, expert_type: str, optimizer_steps: int = 0):
        self._lock = threading.Lock()
        self._stats = ExpertStats(uid, expert_type, optimizer_steps=optimizer_steps)

    def record(self, kind: str, samples: int, seconds: float) -> None:
        with self._lock:
            s = self._stats
            if kind == "forward":
                changes = dict(forward_batches=s.forward_batches + 1, forward_samples=s.forward_samples + samples)
            else:
                changes = dict(
                    backward_batches=s.backward_batches + 1, backward_samples=s.backward_samples + samples,
                    optimizer_steps=s.optimizer_steps + 1,
                )
            self._stats = ExpertStats(**{**asdict(s), **changes, "busy_seconds": s.busy_seconds + seconds,
                                         "last_request": time.time()})

    def snapshot(self) -> ExpertStats:
        with self._lock:
            return self._stats
