"""What one served expert did: counters bumped where the work happens (the device's serving thread),
read as a frozen ``ExpertStats`` by the node's stats collector (``volunteer.node.stats``)."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

FORWARD_FLOPS_PER_PARAM = 2
BACKWARD_FLOPS_PER_PARAM = 6


@dataclass(frozen=True)
class ExpertStats:
    uid: str
    expert_type: str
    params: int = 0
    forward_batches: int = 0
    forward_samples: int = 0
    backward_batches: int = 0
    backward_samples: int = 0
    optimizer_steps: int = 0  # lifetime, restored from the checkpoint
    busy_seconds: float = 0.0
    last_request: float | None = None  # unix time

    @property
    def flops(self) -> float:
        return self.params * (FORWARD_FLOPS_PER_PARAM * self.forward_samples
                              + BACKWARD_FLOPS_PER_PARAM * self.backward_samples)

    def to_dict(self) -> dict:
        return asdict(self)


class ExpertCounters:
    """Mutable counters of one expert, bumped by the Runtime thread; ``snapshot()`` is the frozen view."""

    def __init__(self, uid: str, expert_type: str, optimizer_steps: int = 0, params: int = 0):
        self._lock = threading.Lock()
        self.uid, self.expert_type, self.params = uid, expert_type, params
        self._counts = dict(forward_batches=0, forward_samples=0, backward_batches=0, backward_samples=0,
                            optimizer_steps=optimizer_steps)
        self._busy, self._last = 0.0, None

    def record(self, kind: str, samples: int, seconds: float) -> None:
        with self._lock:
            self._counts[f"{kind}_batches"] += 1
            self._counts[f"{kind}_samples"] += samples
            if kind == "backward":  # every backward applies the optimizer once
                self._counts["optimizer_steps"] += 1
            self._busy += seconds
            self._last = time.time()

    def snapshot(self) -> ExpertStats:
        with self._lock:
            return ExpertStats(self.uid, self.expert_type, self.params, **self._counts,
                               busy_seconds=self._busy, last_request=self._last)
