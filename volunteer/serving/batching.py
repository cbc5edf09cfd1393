"""One worker thread per device: it batches the queued requests of the experts placed there and computes them.

The lean request path (``serving.handler``) checks a request on the event loop and hands it here as a
``Task``; the worker of the expert's device takes the queue whose first task waited longest (as
hivemind's Runtime does), concatenates its tasks up to the expert's max batch size, calls
``CountingBackend.forward``/``backward`` (which counts, holds the expert's lock, refuses while paused,
and sleeps for the power duty cycle), splits the results by task and hands each back to its caller.
Everything stays in this process: tensors are never copied into shared memory, no pipe carries a
future. With one worker per device the GPUs compute at once (torch releases the GIL in kernels).

Each worker has the ``served.ServedClock`` of its device: the handler starts and stops it around each
request, so the announced rate includes everything a trainer waits for, not only torch's share.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from volunteer.serving.backends import CountingBackend, Paused
from volunteer.serving.served import ServedClock, served_rate

__all__ = ["DeviceWorker", "ServedClock", "Task", "WorkerStopped", "served_rate"]

logger = logging.getLogger(__name__)

@dataclass(eq=False)
class Task:
    """One request of one expert: its checked input tensors and where its answer goes."""

    uid: str
    kind: str  # "forward" or "backward"
    inputs: Sequence[torch.Tensor]
    deliver: Callable[[object], None]  # called once, from the worker thread, with outputs or an exception
    queued: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return self.inputs[0].shape[0]


class WorkerStopped(RuntimeError):
    """The device's worker stopped (shutdown or crash) while a request waited."""


class DeviceWorker(threading.Thread):
    """Batches and computes the requests of the experts on one torch device, one batch at a time."""

    def __init__(self, device: str, backends: Mapping[str, CountingBackend]):
        super().__init__(name=f"expert-worker-{device}", daemon=True)
        self.device = torch.device(device)
        self.backends = dict(backends)
        self.queues: dict[tuple[str, str], deque[Task]] = {
            (uid, kind): deque() for uid in self.backends for kind in ("forward", "backward")
        }
        # one condition for all queues of the device: an idle worker sleeps in wait(), no polling
        self._changed = threading.Condition()
        self._stopping = False
        self.clock = ServedClock()

    def submit(self, task: Task) -> None:
        with self._changed:
            if self._stopping or not self.is_alive():
                raise WorkerStopped(f"the worker of {self.device} is not running")
            self.queues[task.uid, task.kind].append(task)
            self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def run(self) -> None:
        try:
            while True:
                with self._changed:
                    while not self._stopping and not any(self.queues.values()):
                        self._changed.wait()
                    if self._stopping:
                        return
                    batch = self._take()
                self._process(batch)
        finally:  # whatever stopped us, nobody may wait for ever on a task still queued
            with self._changed:
                self._stopping = True
                left = [task for queue in self.queues.values() for task in queue]
                for queue in self.queues.values():
                    queue.clear()
            for task in left:
                task.deliver(WorkerStopped(f"the worker of {self.device} stopped"))

    def _take(self) -> list[Task]:
        """The tasks of the queue whose head waited longest, up to the expert's max batch size."""
        queue = min((q for q in self.queues.values() if q), key=lambda q: q[0].queued)
        limit = self.backends[queue[0].uid].max_batch_size
        batch = [queue.popleft()]
        rows = batch[0].rows
        while queue and rows + queue[0].rows <= limit:
            rows += queue[0].rows
            batch.append(queue.popleft())
        return batch

    def _process(self, batch: list[Task]) -> None:
        first = batch[0]
        backend = self.backends[first.uid]
        compute = backend.forward if first.kind == "forward" else backend.backward
        try:
            if len(batch) == 1:
                inputs = list(first.inputs)
            else:  # the checks on the event loop made every task's tensors fit the schema: cat cannot fail
                inputs = [torch.cat(parts) for parts in zip(*(task.inputs for task in batch))]
            inputs = [tensor.to(self.device, non_blocking=True) for tensor in inputs]
            rows = [task.rows for task in batch]
            # each request's rows: a backward is matched to its own forward's kept graph (serving.activations)
            outputs = [output.detach().cpu() for output in compute(*inputs, parts=_parts(rows))]
            split = [torch.split(output, rows) for output in outputs] if len(batch) > 1 else [[o] for o in outputs]
        except BaseException as e:  # a failed batch fails its callers; the worker goes on with the next
            if not isinstance(e, Paused):
                logger.error(f"{first.kind} of {first.uid} failed: {type(e).__name__}: {e}", exc_info=True)
            # SystemExit and the like end the worker; they must not reach the event loop, where
            # they would stop every other device's calls too: the callers get WorkerStopped
            outcome = e if isinstance(e, Exception) else WorkerStopped(f"the worker of {self.device} died: {e!r}")
            for task in batch:
                task.deliver(outcome)
            if not isinstance(e, Exception):
                raise
            return
        for i, task in enumerate(batch):
            task.deliver(tuple(parts[i] for parts in split))


def _parts(rows: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) of each request in the concatenated batch."""
    ends = list(itertools.accumulate(rows))
    return [(end - n, end) for n, end in zip(rows, ends)]
