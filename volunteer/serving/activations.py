"""Forward passes kept for the backward call of the same samples, so the lean path computes each forward once.

hivemind's expert protocol carries no activations: ``rpc_backward`` sends the forward's inputs again
with the output gradients, and hivemind's ``ModuleBackend.backward`` recomputes the forward to get a
graph. That recompute is a third of a forward+backward's compute. A trainer sends each expert its
forward and then, within its step, the backward of the same samples (``coordinator_seeds.dispatch``
and a plain ``RemoteExpert`` both resend the forward's inputs unchanged), so the lean path computes the
forward with autograd on, keeps its graph here, and a backward whose inputs are byte for byte those of
a kept forward runs ``autograd.backward`` on that graph instead of recomputing it.

What makes it safe:

- **Its own weights**: a kept graph is computed on a copy of the weights of its optimizer step (one copy
  a step, shared by that step's forwards: ``CountingBackend._step_weights``), so the optimizer's
  in-place steps leave it intact. With one caller per expert (a trainer: forward, then the backward of
  the same samples) no step comes between and the backward is exactly hivemind's. With several callers
  another's backward may step the weights between a forward and its backward: the kept graph then gives
  the gradient of the function the caller actually computed (hivemind's recompute gives it at the new
  weights instead; both are applied to today's weights, as any delayed gradient). Graphs more than
  ``MAX_STALENESS`` steps old are dropped, and their backward recomputes, as hivemind's.
- **Same samples**: matched on the inputs' bytes (dtype, shape, contents), not on a hash a hostile peer
  could collide. A peer that resends someone else's inputs only gets the gradient a recompute would
  have given it, and the owner's backward then recomputes.
- **Bounded memory**: at most ``max_rows`` samples an expert (its max batch size), so the graphs held
  are at most one max batch of activations: the second set that the memory plan reserves for
  hivemind's recompute (``planning.memory.expert_cost``, activations x2), plus at most
  ``MAX_STALENESS + 1`` copies of the weights (planned too). Entries older than ``max_age`` seconds
  (forward-only callers never send a backward) are dropped at the next forward.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

MAX_AGE = 30.0  # seconds; a trainer's backward comes within its step (its default timeout is 10 s)
MAX_STALENESS = 3  # optimizer steps between a kept forward and its backward (4 concurrent callers)

Rows = tuple[int, int]  # [start, stop) of one request's samples in a batch


@dataclass(eq=False)
class KeptForward:
    """One forward batch's graph: its leaf inputs (``requires_grad`` where floating point), its outputs,
    and the rows of each request batched in it (the device worker concatenates concurrent requests)."""

    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    parts: tuple[Rows, ...]
    step: int  # the expert's optimizer steps when it was computed
    kept_at: float
    weights: Mapping[str, torch.Tensor] | None = None  # the copy of the weights it was computed on
    taken: set[Rows] = field(default_factory=set)  # parts already matched by a backward

    @property
    def rows(self) -> int:
        return self.inputs[0].shape[0]


class KeptForwards:
    """The kept forwards of one expert, oldest first. Used from its device's worker thread; the lock is
    for the readers of the counters and for ``clear`` from elsewhere."""

    def __init__(self, max_rows: int, *, max_age: float = MAX_AGE, clock: Callable[[], float] = time.monotonic):
        self.max_rows, self.max_age, self._clock = max_rows, max_age, clock
        self._kept: deque[KeptForward] = deque()
        self._rows = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0  # requests whose backward used a kept graph / recomputed

    def keep(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], step: int,
             parts: Sequence[Rows] | None = None, weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Keep a forward computed at optimizer step ``step``; the oldest go to stay within ``max_rows``."""
        rows = inputs[0].shape[0]
        entry = KeptForward(tuple(inputs), tuple(outputs), tuple(parts or ((0, rows),)), step, self._clock(),
                            weights)
        if rows > self.max_rows:
            return
        with self._lock:
            self._drop_expired(entry.kept_at)
            while self._kept and self._rows + rows > self.max_rows:
                self._rows -= self._kept.popleft().rows
            self._kept.append(entry)
            self._rows += rows

    def take(self, inputs: Sequence[torch.Tensor], since: int) -> tuple[KeptForward, Rows] | None:
        """The kept forward holding one request of exactly these inputs, computed at optimizer step
        ``since`` or later, and that request's rows in it; each kept request is matched once."""
        with self._lock:
            for entry in self._kept:
                if entry.step < since:
                    continue
                for start, stop in entry.parts:
                    if (start, stop) not in entry.taken and stop - start == inputs[0].shape[0] and _same(
                            [t[start:stop] for t in entry.inputs], inputs):
                        entry.taken.add((start, stop))
                        if len(entry.taken) == len(entry.parts):  # every request of it had its backward
                            self._kept.remove(entry)
                            self._rows -= entry.rows
                        self.hits += 1
                        return entry, (start, stop)
            self.misses += 1
            return None

    def clear(self) -> None:
        """Drop every graph."""
        self.drop_before(float("inf"))

    def drop_before(self, step: float) -> None:
        """Drop the graphs computed before optimizer step ``step`` (too stale to use)."""
        with self._lock:
            kept = deque(entry for entry in self._kept if entry.step >= step)
            self._kept, self._rows = kept, sum(entry.rows for entry in kept)

    @property
    def rows(self) -> int:
        return self._rows

    def __len__(self) -> int:
        return len(self._kept)

    def _drop_expired(self, now: float) -> None:
        while self._kept and now - self._kept[0].kept_at > self.max_age:
            self._rows -= self._kept.popleft().rows


def _same(kept: Sequence[torch.Tensor], given: Sequence[torch.Tensor]) -> bool:
    """Byte equality (not float equality: -0.0 and 0.0 differ here), shapes and dtypes first."""
    if len(kept) != len(given):
        return False
    for a, b in zip(kept, given):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
    return all(_bytes(a).equal(_bytes(b)) for a, b in zip(kept, given))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.reshape(-1).view(torch.uint8)
