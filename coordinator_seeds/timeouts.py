"""How long the trainer waits for an expert call: a bound that follows the calls it has seen succeed.

A fixed 10 s is both too long and too short: on loopback a dead server costs a step 10 s although calls
answer in 50 ms, while 100 ms away behind a slow uplink a healthy 512 KiB call can take a few seconds.
So each layer keeps, per direction, the durations of its last successful calls (the round trip plus
the server's work and queueing, as the trainer sees them) and waits ``factor`` times the slowest of
them plus ``slack``, never less than ``floor`` and never more than the configured ceiling. Until a
few calls have been seen it waits the ceiling. The slowest recent call, not a mean: a spurious
timeout evicts a healthy expert for half a minute, which costs more than waiting a little longer.
"""

from __future__ import annotations

import collections
import threading

MIN_SAMPLES = 4  # below this many successful calls, the ceiling applies


class CallTimeouts:
    """The timeout for the next call: ``clamp(factor * max(recent) + slack, floor, ceiling)``."""

    def __init__(self, ceiling: float, *, floor: float = 2.0, factor: float = 3.0, slack: float = 1.0,
                 window: int = 32):
        self.ceiling, self.floor, self.factor, self.slack = ceiling, floor, factor, slack
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self._lock = threading.Lock()  # observed on hivemind's event loop, read by the trainer's threads

    def observe(self, seconds: float) -> None:
        """A call that answered in ``seconds``."""
        with self._lock:
            self._recent.append(seconds)

    def current(self) -> float:
        with self._lock:
            if len(self._recent) < MIN_SAMPLES:
                return self.ceiling
            slowest = max(self._recent)
        return min(self.ceiling, max(self.floor, self.factor * slowest + self.slack))
