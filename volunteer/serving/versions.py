"""The server's half of audits: every answer commits to the version of the expert that produced it, and
recent versions are kept, for a bounded time and count, to be revealed (``volunteer.core.audit_check``).

``AuditedBackend`` is a ``CountingBackend`` whose forward computes ``(output, commitment)`` and whose
backward ``(input gradient, before+after commitment)``; the commitment is one int64 row per answered
sample, so hivemind's TaskPool batches and splits it like any output. hivemind's own handler sends
plain clients the first tensor only, and so does the lean path (``serving.handler`` serialises the outputs
its schema lists); the project's trainers call ``AUDITED_FORWARD``/``_BACKWARD`` (``RevealService``)
and get both, computed where plain calls are: hivemind's TaskPools, or on the lean path the device's
``batching.DeviceWorker``, so audited and plain calls batch together and a server cannot tell them apart
by where they run. ``VersionStore`` keeps the last ``keep`` versions (each for at most ``keep_for``
seconds after a newer one replaced it); its memory is ``keep`` copies of the weights and optimizer
state plus the batches of the steps that made them (``memory_bytes``), counted in the bench's figure.
``RevealService`` answers ``VolunteerAudit.rpc_reveal`` on the server's P2P with a stream: the
reveal's structure (msgpack) first, then its tensors in parts of ``REVEAL_PART_BYTES``, as hivemind
streams its own large answers (``split_for_streaming``); only what the audit's kind needs
(``Reveal.opened``). The audited calls have streaming forms too (``AUDITED_FORWARD_STREAM``/``_BACKWARD_``),
for requests above hivemind's unary size, which the trainer uses exactly where hivemind's client would.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Mapping, NamedTuple

import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils import nested_flatten
from hivemind.utils.streaming import split_for_streaming

from volunteer.core.audit_check import (
    AUDITED_BACKWARD,
    AUDITED_BACKWARD_STREAM,
    AUDITED_FORWARD,
    AUDITED_FORWARD_STREAM,
    NO_OPTIMIZER_DIGEST,
    REVEAL_RPC,
    Commitment,
    Reveal,
    RevealRequest,
    combined_digest,
    encode_reveal,
    find_own_rows,
    leaf_digest,
    optimizer_leaf,
    weights_leaf,
)
from volunteer.core.streams import PLAIN_LINGER, add_graceful_stream_handler
from volunteer.core.wire import serialize
from volunteer.serving.backends import CountingBackend, Paused, malformed
from volunteer.serving.batching import DeviceWorker, Task
from volunteer.serving.handler import _deliverer, _gather, _stream_parts
from volunteer.serving.version_budget import (
    KEEP_FOR,
    KEEP_VERSIONS,
    version_bytes,
    versions_to_keep,
)

logger = logging.getLogger(__name__)
REVEAL_PART_BYTES = 2**18  # one message of a streamed reveal: small enough to show progress on a slow link


class _State:
    """One kept version's weights and optimizer state, packed in one flat host buffer in the digest's
    stream order (``audit_check.weights_leaf``, then ``optimizer_leaf``), so that its copy is one call
    and its digest one hash call a leaf; the buffer is reused by a later version once this one expires."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer  # uint8, on the host
        self.layout: tuple[bytes, bytes | None] | None = None  # the leaves' headers its views were cut for
        self.views: list[torch.Tensor] = []  # where each tensor of the stream goes, typed and shaped
        self.spans: list[tuple[int, int, torch.dtype, tuple[int, ...]]] = []  # offset, bytes, dtype, shape
        self.weights_bytes = self.total = 0
        self.tight = True  # no alignment gap between tensors: each leaf is one contiguous run of bytes
        self.weight_names: list[str] = []
        self.optimizer_keys: list[tuple[int, str]] = []
        self.optimizer_values: list[tuple[tuple[int, str], Any]] = []  # its entries that are not tensors
        self.param_groups: list | None = None  # None: no optimizer

    def fill(self, weights: tuple[bytes, list], optimizer: tuple[bytes, list] | None, optimizer_state) -> None:
        """Copy the leaves' tensors in; cut the views first if the layout changed (the first step makes
        Adam's moments, so version 0 is smaller than the rest)."""
        layout = (weights[0], optimizer[0] if optimizer is not None else None)
        entries = weights[1] + (optimizer[1] if optimizer is not None else [])
        if layout != self.layout:
            self._cut(layout, weights[1], entries)
        self.weight_names = [name for name, _ in weights[1]]
        self.optimizer_keys = [key for key, _ in optimizer[1]] if optimizer is not None else []
        self.optimizer_values = ([((i, n), v) for i, s in optimizer_state["state"].items() for n, v in s.items()
                                  if not isinstance(v, torch.Tensor)] if optimizer is not None else [])
        self.param_groups = optimizer_state["param_groups"] if optimizer is not None else None
        tensors = [t.detach() for _, t in entries]
        if _foreach_copy is not None and all(t.device.type == "cpu" for t in tensors):
            _foreach_copy(self.views, tensors)
        else:  # a device's tensors, each brought to the host
            for view, tensor in zip(self.views, tensors):
                view.copy_(tensor)

    def _cut(self, layout: tuple[bytes, bytes | None], weights: list, entries: list) -> None:
        self.layout, self.views, self.spans = layout, [], []
        offset = 0
        for index, (_, tensor) in enumerate(entries):
            if index == len(weights):
                self.weights_bytes = offset
            size = tensor.element_size()
            start = -(-offset // size) * size  # aligned for a typed view of the bytes
            length = tensor.numel() * size
            self.spans.append((start, length, tensor.dtype, tuple(tensor.shape)))
            offset = start + length
        if len(entries) == len(weights):
            self.weights_bytes = offset
        self.total = offset
        self.tight = all(start == (self.spans[i - 1][0] + self.spans[i - 1][1] if i else 0)
                         for i, (start, _, _, _) in enumerate(self.spans))
        if self.buffer.numel() < self.total:
            self.buffer = torch.empty(self.total, dtype=torch.uint8)
        self.views = [self._typed(self.buffer, span) for span in self.spans]

    @staticmethod
    def _typed(buffer: torch.Tensor, span: tuple[int, int, torch.dtype, tuple[int, ...]]) -> torch.Tensor:
        start, length, dtype, shape = span
        return buffer[start:start + length].view(dtype).view(shape)

    def digests(self) -> tuple[bytes, bytes]:
        """The two leaves' digests, over the buffer's bytes (one run a leaf unless alignment left gaps)."""
        data = self.buffer.numpy()
        weights = self._leaf(data, self.layout[0], self.spans[:len(self.weight_names)], 0, self.weights_bytes)
        if self.param_groups is None:
            return weights, NO_OPTIMIZER_DIGEST
        optimizer = self._leaf(data, self.layout[1], self.spans[len(self.weight_names):], self.weights_bytes,
                               self.total)
        return weights, optimizer

    def _leaf(self, data, header: bytes, spans, start: int, end: int) -> bytes:
        runs = [data[start:end]] if self.tight else [data[s:s + n] for s, n, _, _ in spans]
        return leaf_digest(header, runs, None, end - start)

    def revealed(self) -> tuple[dict[str, torch.Tensor], dict | None]:
        """The state as ``module.state_dict()`` and ``optimizer.state_dict()`` gave it, in a copy of the
        buffer: a reveal may still be encoding when the buffer is reused for a later version."""
        data = self.buffer[:self.total].clone()
        tensors = [self._typed(data, span) for span in self.spans]
        module = dict(zip(self.weight_names, tensors))
        if self.param_groups is None:
            return module, None
        state: dict[int, dict[str, Any]] = {}
        for (index, name), value in zip(self.optimizer_keys, tensors[len(self.weight_names):]):
            state.setdefault(index, {})[name] = value
        for (index, name), value in self.optimizer_values:
            state.setdefault(index, {})[name] = value
        return module, {"state": state, "param_groups": self.param_groups}


_foreach_copy = getattr(torch, "_foreach_copy_", None)  # one call for all tensors (torch >= 2.1); else one each


class _Kept(NamedTuple):
    since: float  # when it stopped being current (or was made, while it is)
    state: _State
    commit: Commitment
    parent: int | None
    inputs: torch.Tensor | None
    grads: torch.Tensor | None


class VersionStore:
    """Recent versions of one expert, by number. Version 0 is the state at start; each optimizer step
    makes the next one. Thread-safe: the Runtime thread writes, the reveal service reads.

    Each version is one flat host buffer (``_State``); at most ``keep`` of them exist, those of the kept
    versions and the spares of expired ones, which the next versions reuse: no allocation, no page
    faults, one copy call and one hash call a leaf per optimizer step."""

    def __init__(self, keep: int = KEEP_VERSIONS, keep_for: float = KEEP_FOR,
                 clock: Callable[[], float] = time.monotonic):
        self.keep, self.keep_for, self.clock = keep, keep_for, clock
        self._versions: OrderedDict[int, _Kept] = OrderedDict()
        self._spares: list[_State] = []
        self._current: Commitment | None = None
        self._lock = threading.Lock()

    def current(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Commitment:
        """The commitment of the state now; the first call snapshots it as version 0."""
        with self._lock:
            if self._current is None:
                self._current = self._add(0, module, optimizer, None, None, None)
            return self._current

    def advance(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, before: Commitment,
                inputs: torch.Tensor, grads: torch.Tensor) -> Commitment:
        """After an optimizer step from ``before`` on ``inputs``/``grads``: the new version."""
        with self._lock:
            self._current = self._add(before.version + 1, module, optimizer, before.version, inputs, grads)
            return self._current

    def reveal(self, version: int) -> Reveal | None:
        """The version, with its parent for a trained one; None if it is no longer kept."""
        with self._lock:
            self._expire()
            kept = self._versions.get(version)
            if kept is None:
                return None
            parent = None
            if kept.parent is not None:
                parent_kept = self._versions.get(kept.parent)
                if parent_kept is None:
                    return None
                parent = Reveal(kept.parent, *parent_kept.state.revealed())
            return Reveal(version, *kept.state.revealed(), parent, kept.inputs, kept.grads)

    def memory_bytes(self) -> int:
        """The host memory it holds: the buffers, kept and spare, and the kept versions' batches."""
        with self._lock:
            states = [k.state for k in self._versions.values()] + self._spares
            batches = [t for k in self._versions.values() for t in (k.inputs, k.grads) if t is not None]
            return sum(s.buffer.numel() for s in states) + sum(t.numel() * t.element_size() for t in batches)

    def __len__(self) -> int:
        return len(self._versions)

    def _add(self, number: int, module, optimizer, parent: int | None, inputs, grads) -> Commitment:
        optimizer_state = optimizer.state_dict() if optimizer is not None else None
        weights = weights_leaf(module.state_dict())
        optimizer_part = optimizer_leaf(optimizer_state) if optimizer_state is not None else None
        while len(self._versions) >= self.keep and len(self._versions) > 1:  # room; the newest (its parent) stays
            self._spares.append(self._versions.popitem(last=False)[1].state)
        state = self._spares.pop() if self._spares else _State(torch.empty(0, dtype=torch.uint8))
        state.fill(weights, optimizer_part, optimizer_state)
        commit = Commitment(number, combined_digest(*state.digests()))
        now = self.clock()
        if self._versions:  # the version this one supersedes was answered with until now: its age starts here
            last = next(reversed(self._versions))
            self._versions[last] = self._versions[last]._replace(since=now)
        self._versions[number] = _Kept(now, state, commit, parent,
                                       None if inputs is None else inputs.detach().to("cpu", copy=True),
                                       None if grads is None else grads.detach().to("cpu", copy=True))
        self._expire()
        return commit

    def _expire(self) -> None:
        # a version's time is when it stopped being current (the current one's, when it was made): an
        # expert idle for longer than ``keep_for`` must still reveal the parent of its next step
        cutoff = self.clock() - self.keep_for
        while self._versions and (len(self._versions) > self.keep or next(iter(self._versions.values())).since < cutoff):
            if len(self._versions) == 1:
                break  # the current version is always kept
            self._spares.append(self._versions.popitem(last=False)[1].state)


class AuditedBackend(CountingBackend):
    """A CountingBackend whose answers carry commitments, and whose versions can be revealed."""

    def __init__(self, name: str, module: torch.nn.Module, *, keep: int | None = None, keep_for: float = KEEP_FOR,
                 **kwargs):
        super().__init__(name, module, **kwargs)
        if keep is None:  # as the memory plan counts it (``planning.memory.audit_bytes``)
            states = 2 if type(self.optimizer).__name__.startswith("Adam") else 1
            d_model = self.args_schema[0].size[1]
            params = sum(p.numel() for p in module.parameters())
            keep = versions_to_keep(version_bytes(params, states, self.max_batch_size, d_model))
        # hivemind's schemas stay those of one output: its ConnectionHandler serializes only what they
        # list, so plain hivemind clients get the answer alone; ``RevealService`` answers the project's
        # trainers with the commitment too (AUDITED_FORWARD / AUDITED_BACKWARD)
        self.versions = VersionStore(keep, keep_for)
        # A kept forward (lean path, ``serving.activations``) is used only if no optimizer step came
        # between it and its backward: then the weights it ran on are the version the backward commits
        # to as "before", and an audit's recomputation at that version is the same computation. An older
        # one is recomputed at the current version, as hivemind's backward does.
        self.max_staleness = 0

    def forward(self, *inputs: torch.Tensor, parts=None) -> tuple[torch.Tensor, ...]:
        return self._counted("forward", partial(self._committed_forward, parts=parts), inputs)

    def backward(self, *inputs: torch.Tensor, parts=None) -> tuple[torch.Tensor, ...]:
        return self._counted("backward", partial(self._committed_backward, parts=parts), inputs)

    def _committed_forward(self, *inputs: torch.Tensor, parts=None) -> tuple[torch.Tensor, ...]:
        if self.kept is not None:
            (output,) = self._forward_kept(*inputs, parts=parts)
        else:
            (output,) = ModuleBackend.forward(self, *inputs)
        commit = self.versions.current(self.module, self.optimizer)
        return output, _rows(commit.row(), len(output))

    def _committed_backward(self, x: torch.Tensor, grad: torch.Tensor, parts=None) -> tuple[torch.Tensor, ...]:
        before = self.versions.current(self.module, self.optimizer)
        if self.kept is not None:  # one optimizer step, on the kept graphs of this version where they match
            (grad_in,) = self._backward_kept(x, grad, parts=parts)
        else:
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                self.module(x_in).backward(grad.to(x.device, x.dtype))
            self.on_backward(len(x))
            grad_in = x_in.grad
        # The copy and digest of the new state stay on this answer's path: the answer must bind the state
        # its step made before any trainer can ask for it. An answer that carried the "after" version
        # without its digest would let a server pick that state at reveal time: a frozen copy would
        # reveal before + the recomputed update, pass, and keep answering from its frozen weights, whose
        # digest the next answers would carry with nothing tying it to this step.
        after = self.versions.advance(self.module, self.optimizer, before, x, grad)
        return grad_in, _rows(before.row() + after.row(), len(x))

    def reveal(self, version: int) -> Reveal | None:
        return self.versions.reveal(version)


def _rows(row: list[int], n: int) -> torch.Tensor:
    return torch.tensor(row, dtype=torch.int64).expand(n, len(row)).contiguous()


class RevealService:
    """Answers ``REVEAL_RPC`` (uid + version in the request's metadata) with that version's state, on a
    replica of the server's P2P, from a thread and event loop of its own."""

    def __init__(self, dht, backends: Mapping[str, AuditedBackend], workers: Mapping[str, DeviceWorker] | None = None):
        """``workers``: uid -> its device's worker on the lean path (``LeanServer.handler.workers``);
        None on hivemind's path, where the backends' TaskPools compute."""
        self.dht, self.backends = dht, dict(backends)
        self.workers = dict(workers) if workers is not None else None
        self.schemas = {uid: dict(forward=tuple(nested_flatten(b.forward_schema)),
                                  backward=tuple(nested_flatten(b.backward_schema)))
                        for uid, b in self.backends.items()}
        # answers go back compressed as the schemas say (the experiment's wire dtype), commitments as they are
        self.answer_wire = {uid: dict(forward=tuple(nested_flatten(b.outputs_schema))[0].compression,
                                      backward=tuple(nested_flatten(b.grad_inputs_schema))[0].compression)
                            for uid, b in self.backends.items()}
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="reveal service", daemon=True)
        self.revealed = 0

    def run_in_background(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError("the reveal service did not start")

    def shutdown(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        from hivemind import DHT

        self._stop = asyncio.Event()
        p2p = await P2P.replicate(self.dht.run_coroutine(DHT._get_p2p_daemon_listen_maddr))
        # streams end gracefully (core.streams): the daemons would otherwise cut 1-3 answers in 1,000; the
        # trainer's reveal reader closes first, the audited streams' (hivemind's reader) waits PLAIN_LINGER
        await add_graceful_stream_handler(p2p, REVEAL_RPC, self._reveal, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(AUDITED_FORWARD, self._forward, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(AUDITED_BACKWARD, self._backward, runtime_pb2.ExpertRequest)
        await add_graceful_stream_handler(p2p, AUDITED_FORWARD_STREAM, self._forward_stream, runtime_pb2.ExpertRequest,
                                          stream_input=True, linger=PLAIN_LINGER)
        await add_graceful_stream_handler(p2p, AUDITED_BACKWARD_STREAM, self._backward_stream,
                                          runtime_pb2.ExpertRequest, stream_input=True, linger=PLAIN_LINGER)
        self.ready.set()
        try:
            await self._stop.wait()
        finally:
            await p2p.shutdown()

    async def _forward(self, request: runtime_pb2.ExpertRequest, _context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(tensors=await self._call(request.uid, request.tensors, "forward"))

    async def _backward(self, request: runtime_pb2.ExpertRequest, _context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(tensors=await self._call(request.uid, request.tensors, "backward"))

    async def _forward_stream(self, requests, _context: P2PContext):
        uid, inputs = await _gather(requests)
        for part in _stream_parts(await self._call(uid, inputs, "forward")):
            yield runtime_pb2.ExpertResponse(tensors=[part])

    async def _backward_stream(self, requests, _context: P2PContext):
        uid, inputs = await _gather(requests)
        for part in _stream_parts(await self._call(uid, inputs, "backward")):
            yield runtime_pb2.ExpertResponse(tensors=[part])

    async def _call(self, uid: str, tensors, kind: str) -> list[runtime_pb2.Tensor]:
        """All outputs of the call (answer and commitment), computed where hivemind's calls are."""
        backend = self.backends.get(uid)
        if backend is None:
            raise KeyError(f"no expert {uid!r} is served here")
        inputs = [t if isinstance(t, torch.Tensor) else deserialize_torch_tensor(t) for t in tensors]
        if self.workers is None:  # hivemind's path: the same TaskPool as its handler (checked there)
            outputs = await getattr(backend, f"{kind}_pool").submit_task(*inputs)
        else:
            outputs = await self._on_worker(uid, kind, inputs)
        wire = self.answer_wire[uid][kind]
        return [serialize(t, wire) for t in outputs]

    async def _on_worker(self, uid: str, kind: str, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The lean path's request, as ``handler.ExpertHandler`` runs it: checked, queued on the device's
        worker (batched with plain calls), timed by the device's served clock."""
        backend, worker = self.backends[uid], self.workers[uid]
        problem = malformed(inputs, self.schemas[uid][kind])
        if problem is None and inputs[0].shape[0] > backend.max_batch_size:
            problem = f"batch of {inputs[0].shape[0]} exceeds the max batch size {backend.max_batch_size}"
        if problem is not None:
            raise ValueError(f"{uid} {kind}: {problem}")
        if backend.paused.is_set():
            raise Paused(f"{uid} is paused by its volunteer")
        worker.clock.begin()
        trained = 0
        try:
            future = asyncio.get_running_loop().create_future()
            worker.submit(Task(uid, kind, inputs, deliver=_deliverer(asyncio.get_running_loop(), future)))
            outputs = await future
            trained = inputs[0].shape[0] if kind == "backward" else 0
            return outputs
        finally:
            worker.clock.end(trained)

    async def _reveal(self, request: runtime_pb2.ExpertRequest, _context: P2PContext):
        """A stream: the structure first (empty metadata: no such version is kept), then the tensors' parts."""
        self.revealed += 1
        encoded = await asyncio.get_running_loop().run_in_executor(None, self._encoded, request)
        if encoded is None:
            yield runtime_pb2.ExpertResponse(metadata=b"")
            return
        header, tensors = encoded
        yield runtime_pb2.ExpertResponse(metadata=header)
        for tensor in tensors:
            for part in split_for_streaming(tensor, REVEAL_PART_BYTES):
                yield runtime_pb2.ExpertResponse(tensors=[part])

    def _encoded(self, request: runtime_pb2.ExpertRequest) -> tuple[bytes, list[runtime_pb2.Tensor]] | None:
        """What the request's audit needs of the version, encoded; None if it is not kept (or not asked well)."""
        backend = self.backends.get(request.uid)
        try:
            asked = RevealRequest.from_bytes(request.metadata)
        except ValueError:
            return None
        reveal = backend.reveal(asked.version) if backend is not None else None
        if reveal is None:
            return None
        opened = reveal.opened(asked.kind)
        own_at = None
        if opened.inputs is not None and asked.rows:
            own_at = find_own_rows(opened.inputs, opened.grads, asked.rows, asked.rows_digest)
        return encode_reveal(opened, own_at, asked.rows if own_at is not None else 0)
