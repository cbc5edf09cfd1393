"""Served throughput: what a device's serving path answers, measured where the requests arrive.

``ServedClock`` is what makes the announced throughput honest: it counts the time at least one request
of the device was in the serving path (deserialised, queued, computed, answered) and the samples
trained, so the rate it gives includes everything a trainer waits for, not only torch's share.

On the lean path the requests arrive on the RPC loop's thread (``serving.handler``): a thread lock is
enough. On hivemind's path they arrive in the connection-handler processes, which hivemind forks after
the clock is made: ``ServedClock.shared()`` keeps its figures in shared memory under a process lock, so
every handler adds to the one clock of the device and the node reads it.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Sequence

IN_FLIGHT, SINCE, BUSY, SAMPLES = range(4)  # the clock's figures, in order


class ServedClock:
    """Busy time of a device's serving path (any request in flight) and the training samples it answered.

    Called at a request's arrival (``begin``) and answer (``end``); read by the node when it announces."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, *, lock=None, figures=None):
        self._clock = clock
        self._lock = lock if lock is not None else threading.Lock()
        self._figures = figures if figures is not None else [0.0] * 4

    @classmethod
    def shared(cls) -> ServedClock:
        """A clock that processes forked after it was made add to (perf_counter is system-wide on Linux)."""
        return cls(lock=mp.Lock(), figures=mp.RawArray("d", 4))

    def begin(self) -> None:
        with self._lock:
            f = self._figures
            if f[IN_FLIGHT] == 0:
                f[SINCE] = self._clock()
            f[IN_FLIGHT] += 1

    def end(self, trained_samples: int = 0) -> None:
        with self._lock:
            f = self._figures
            f[IN_FLIGHT] -= 1
            if f[IN_FLIGHT] == 0:
                f[BUSY] += self._clock() - f[SINCE]
            f[SAMPLES] += trained_samples

    def reading(self) -> tuple[int, float]:
        """(samples trained, busy seconds) so far, the request in flight counted up to now."""
        with self._lock:
            f = self._figures
            busy = f[BUSY] + (self._clock() - f[SINCE] if f[IN_FLIGHT] else 0.0)
            return int(f[SAMPLES]), busy


# Below this much serving the figure is mostly noise (a cold first batch, one lone request):
# the node then announces its local torch measurement instead.
MIN_SERVED_SECONDS = 2.0
MIN_SERVED_SAMPLES = 256


def served_rate(readings: Sequence[tuple[int, float]]) -> float | None:
    """Training samples/s through the serving path, the devices' rates added up (they compute at once);
    None until every device has served ``MIN_SERVED_SAMPLES`` in ``MIN_SERVED_SECONDS`` of busy time."""
    if not readings or any(s < MIN_SERVED_SAMPLES or t < MIN_SERVED_SECONDS for s, t in readings):
        return None
    return sum(samples / seconds for samples, seconds in readings)
