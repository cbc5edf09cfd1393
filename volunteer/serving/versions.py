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
from typing import Callable, Mapping

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
    REVEAL_RPC,
    Commitment,
    Reveal,
    RevealRequest,
    encode_reveal,
    find_own_rows,
    state_digest,
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


def _copy_state(state):
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _copy_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copy_state(v) for v in state)
    return state


class VersionStore:
    """Recent versions of one expert, by number. Version 0 is the state at start; each optimizer step
    makes the next one. Thread-safe: the Runtime thread writes, the reveal service reads."""

    def __init__(self, keep: int = KEEP_VERSIONS, keep_for: float = KEEP_FOR,
                 clock: Callable[[], float] = time.monotonic):
        self.keep, self.keep_for, self.clock = keep, keep_for, clock
        self._versions: OrderedDict[int, tuple[float, Reveal, Commitment]] = OrderedDict()
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
            reveal = kept[1]
            if reveal.parent is not None:  # stored as a number: fill it in from the store
                parent = self._versions.get(reveal.parent.version)
                if parent is None:
                    return None
                reveal = Reveal(reveal.version, reveal.module, reveal.optimizer, parent[1], reveal.inputs, reveal.grads)
            return reveal

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(_nbytes(r) for _, r, _ in self._versions.values())

    def __len__(self) -> int:
        return len(self._versions)

    def _add(self, number: int, module, optimizer, parent: int | None, inputs, grads) -> Commitment:
        module_state = _copy_state(module.state_dict())
        optimizer_state = _copy_state(optimizer.state_dict()) if optimizer is not None else None
        commit = Commitment(number, state_digest(module_state, optimizer_state))
        placeholder = Reveal(parent, {}, None) if parent is not None else None
        reveal = Reveal(number, module_state, optimizer_state, placeholder,
                        None if inputs is None else inputs.detach().to("cpu", copy=True),
                        None if grads is None else grads.detach().to("cpu", copy=True))
        now = self.clock()
        if self._versions:  # the version this one supersedes was answered with until now: its age starts here
            last, (_, kept, kept_commit) = next(reversed(self._versions.items()))
            self._versions[last] = (now, kept, kept_commit)
        self._versions[number] = (now, reveal, commit)
        self._expire()
        return commit

    def _expire(self) -> None:
        # a version's time is when it stopped being current (the current one's, when it was made): an
        # expert idle for longer than ``keep_for`` must still reveal the parent of its next step
        cutoff = self.clock() - self.keep_for
        while self._versions and (len(self._versions) > self.keep or next(iter(self._versions.values()))[0] < cutoff):
            if len(self._versions) == 1:
                break  # the current version is always kept
            self._versions.popitem(last=False)


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Reveal):
        return _nbytes(value.module) + _nbytes(value.optimizer) + _nbytes(value.inputs) + _nbytes(value.grads)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


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
