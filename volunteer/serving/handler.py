"""The lean serving path: hivemind's expert RPCs answered in the process that computes.

A request's path: the p2p daemon (shared with the DHT process) passes a trainer's ``rpc_forward``/
``rpc_backward`` (or their streaming forms) to ``ExpertHandler`` on this process's event loop thread,
registered under hivemind's own protocol names (``ConnectionHandler.rpc_*``) with the same protobuf
messages, so a plain hivemind ``RemoteExpert`` calls it unchanged. The handler deserialises the tensors
(hivemind's serialization), refuses a malformed request, an unknown uid or a paused expert at once
(the caller gets the error), and queues a ``batching.Task`` on the worker thread of the expert's device
(``batching.DeviceWorker``), which batches and computes it with ``CountingBackend`` (counted, locked,
throttled to the power duty cycle); the answer comes back to the loop through
``call_soon_threadsafe`` and is serialised with the expert's output schema.

Compared with hivemind's ``Server`` (connection-handler processes, two TaskPool processes per expert,
every tensor moved through shared-memory files and an ``MPFuture`` pipe a task) nothing crosses a
process here. ``LeanServer`` stands in for ``serving.backends.VolunteerServer`` where the node uses it:
``run_in_background``, ``ready``, ``failure``, ``shutdown``, ``join``, ``dht_handler_thread`` (hivemind's
own declaring thread: ``declare_experts``), ``module_backends``, ``conn_handlers`` (none).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import (
    AsyncIterator,  # not collections.abc's: hivemind's ServicerBase spots streams by typing's name
)

import torch
from hivemind.compression import (
    deserialize_tensor_stream,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.dht import DHT
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.dht_handler import DHTHandlerThread
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.p2p.p2p_daemon import DEFAULT_MAX_MSG_SIZE
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer, nested_flatten
from hivemind.utils.streaming import split_for_streaming

from volunteer.core.streams import PLAIN_LINGER, add_graceful_stream_handler
from volunteer.serving.backends import (
    CountingBackend,
    Paused,
    ServerStartError,
    malformed,
    stop_declaring,
)
from volunteer.serving.batching import DeviceWorker, Task

logger = logging.getLogger(__name__)
STOP_TIMEOUT = 5.0


class ExpertHandler(ServicerBase):
    """hivemind's ``ConnectionHandler`` protocol, served on an event loop of the computing process."""

    def __init__(self, backends: Mapping[str, CountingBackend], workers: Mapping[str, DeviceWorker]):
        self.backends = dict(backends)
        self.workers = dict(workers)  # uid -> the worker of its device
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the handlers are registered
        # the flat schemas, computed once: hivemind recomputes nested_flatten for every request
        self.schemas = {uid: dict(forward=tuple(nested_flatten(b.forward_schema)),
                                  backward=tuple(nested_flatten(b.backward_schema)))
                        for uid, b in self.backends.items()}
        self.output_schemas = {uid: dict(forward=tuple(nested_flatten(b.outputs_schema)),
                                         backward=tuple(nested_flatten(b.grad_inputs_schema)))
                               for uid, b in self.backends.items()}

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        # hivemind's clients call "ConnectionHandler.rpc_forward": answer under that name, not ours
        return ConnectionHandler._get_handle_name(namespace, method_name)

    async def add_p2p_handlers(self, p2p: P2P, wrapper: object = None, *, namespace: str | None = None,
                               balanced: bool = False) -> None:
        """hivemind's registration (``ServicerBase``), with the streaming forms ended gracefully
        (``core.streams``: the daemons would otherwise cut some answers); removed as hivemind's are."""
        self._collect_rpc_handlers()
        servicer = self if wrapper is None else wrapper
        for rpc in self._rpc_handlers:
            name, method = self._get_handle_name(namespace, rpc.method_name), getattr(servicer, rpc.method_name)
            if rpc.stream_output:
                await add_graceful_stream_handler(p2p, name, method, rpc.request_type, stream_input=rpc.stream_input,
                                                  linger=PLAIN_LINGER, balanced=balanced)
            else:
                await p2p.add_protobuf_handler(name, method, rpc.request_type, stream_input=rpc.stream_input,
                                               balanced=balanced)

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(self._backend(request.uid).get_info()))

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext
                          ) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(tensors=await self._answer(request.uid, "forward", request.tensors))

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext
                           ) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(tensors=await self._answer(request.uid, "backward", request.tensors))

    async def rpc_forward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
                                 ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        uid, inputs = await _gather(requests)
        for part in _stream_parts(await self._answer(uid, "forward", inputs)):
            yield runtime_pb2.ExpertResponse(tensors=[part])

    async def rpc_backward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
                                  ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        uid, inputs = await _gather(requests)
        for part in _stream_parts(await self._answer(uid, "backward", inputs)):
            yield runtime_pb2.ExpertResponse(tensors=[part])

    def _backend(self, uid: str) -> CountingBackend:
        try:
            return self.backends[uid]
        except KeyError:
            raise KeyError(f"no expert {uid!r} is served here") from None

    async def _answer(self, uid: str, kind: str, tensors: Iterable[runtime_pb2.Tensor] | list[torch.Tensor]
                      ) -> list[runtime_pb2.Tensor]:
        """Check, queue on the device's worker, wait, serialise: one request of ``uid``, start to end."""
        backend = self._backend(uid)
        clock = self.workers[uid].clock
        clock.begin()
        trained = 0
        try:
            inputs = [t if isinstance(t, torch.Tensor) else deserialize_torch_tensor(t) for t in tensors]
            problem = malformed(inputs, self.schemas[uid][kind])
            if problem is None and inputs[0].shape[0] > backend.max_batch_size:
                problem = f"batch of {inputs[0].shape[0]} exceeds the max batch size {backend.max_batch_size}"
            if problem is not None:
                raise ValueError(f"{uid} {kind}: {problem}")
            if backend.paused.is_set():  # refused before queueing: the trainer fails over at once
                raise Paused(f"{uid} is paused by its volunteer")
            outputs = await self._computed(Task(uid, kind, inputs, deliver=None))
            trained = inputs[0].shape[0] if kind == "backward" else 0
            # A 16-bit wire's compression rewrites its input when allowed in place; a forward's output
            # shares its storage with the graph kept for the backward (KeptForwards), so only the
            # backward's gradients, which nothing keeps, are compressed in place.
            in_place = kind == "backward"
            return [serialize_torch_tensor(output, proto.compression, allow_inplace=in_place)
                    for output, proto in zip(outputs, self.output_schemas[uid][kind])]
        finally:
            clock.end(trained)

    async def _computed(self, task: Task) -> tuple[torch.Tensor, ...]:
        future = self.loop.create_future()
        task.deliver = _deliverer(self.loop, future)
        self.workers[task.uid].submit(task)
        return await future


def _deliverer(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> Callable[[object], None]:
    """The worker thread's way back to the loop: settle the future there, unless the caller went away."""

    def settle(outcome: object) -> None:
        if future.done():  # the call was cancelled (caller disconnected, server stopping)
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def deliver(outcome: object) -> None:
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    return deliver


async def _gather(requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> tuple[str, list[torch.Tensor]]:
    """A streamed request's uid and its tensors, reassembled from their parts (hivemind's format)."""
    uid = None

    async def parts() -> AsyncIterator[Sequence[runtime_pb2.Tensor]]:
        nonlocal uid
        async for request in requests:
            if uid is None:
                uid = request.uid
            elif request.uid != uid:
                raise ValueError("expert uids differ in one request")
            yield request.tensors

    inputs = await deserialize_tensor_stream(parts())
    return uid, inputs


def _stream_parts(tensors: list[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
    return [part for tensor in tensors for part in split_for_streaming(tensor, DEFAULT_MAX_MSG_SIZE)]


class LeanServer:
    """The experts of one node served in-process: an event loop thread for the RPCs, a worker per device.

    ``placed`` is one (torch device, uids) pair per device."""

    def __init__(self, dht: DHT, module_backends: dict[str, CountingBackend],
                 placed: Sequence[tuple[str, Sequence[str]]], *, update_period: float = 30.0,
                 expiration: float | None = None):
        self.dht, self.module_backends = dht, module_backends
        self.workers = [DeviceWorker(device, {uid: module_backends[uid] for uid in uids}) for device, uids in placed]
        by_uid = {uid: worker for worker in self.workers for uid in worker.backends}
        self.handler = ExpertHandler(module_backends, by_uid)
        self.dht_handler_thread = DHTHandlerThread(module_backends=module_backends, dht=dht,
                                                   update_period=update_period, expiration=expiration, daemon=True)
        self.conn_handlers = ()  # none: the node reports their pids
        self.ready = threading.Event()
        self._loop = None
        self._loop_thread = threading.Thread(target=self._run_loop, name="expert-rpc-loop", daemon=True)
        self._registered = threading.Event()
        self._start_error: BaseException | None = None
        self._p2p: P2P | None = None

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """Start the workers and the RPC loop; declare the experts only once their handlers answer."""
        for worker in self.workers:
            worker.start()
        self._loop_thread.start()
        if not self._registered.wait(timeout):
            self.shutdown()
            raise ServerStartError(f"the expert handlers were not registered after {timeout:.0f} s")
        if self._start_error is not None:
            self.shutdown()
            raise ServerStartError(f"could not register the expert handlers: {self._start_error}")
        if self.module_backends:
            self.dht_handler_thread.start()
        self.ready.set()

    def _run_loop(self) -> None:
        try:
            import uvloop  # hivemind's handlers use it too: a cheaper loop per request

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = self.handler.loop = loop
        try:
            loop.run_until_complete(self._register())
            if self._start_error is None:
                loop.run_forever()
        finally:
            try:
                loop.run_until_complete(self._unregister())
            finally:
                loop.close()

    async def _register(self) -> None:
        try:
            # our own replica, not ``dht.replicate_p2p()``: that one is cached per process and may
            # already belong to hivemind's client loop (the node's ``get_experts`` made it)
            maddr = self.dht.run_coroutine(DHT._get_p2p_daemon_listen_maddr)
            self._p2p = await P2P.replicate(maddr)
            await self.handler.add_p2p_handlers(self._p2p)
        except Exception as e:
            logger.error(f"expert handlers failed to start: {type(e).__name__}: {e}")
            self._start_error = e
        finally:
            self._registered.set()

    async def _unregister(self) -> None:
        if self._p2p is not None and self.dht.is_alive():
            try:
                await asyncio.wait_for(self.handler.remove_p2p_handlers(self._p2p), STOP_TIMEOUT)
            except Exception as e:  # the daemon may be gone already
                logger.debug(f"could not remove the expert handlers: {e}")
        if self._p2p is not None:  # closed on its own loop: its finalizer would find no loop later
            await self._p2p.shutdown()
            for _ in range(3):  # let its cancelled reader tasks end
                await asyncio.sleep(0)
        for task in asyncio.all_tasks():  # calls still waiting end now, not at the loop's garbage collection
            if task is not asyncio.current_task():
                task.cancel()

    def failure(self) -> str | None:
        """What stopped working, or None while it serves (the node's health check)."""
        if not self._loop_thread.is_alive():
            return "the expert RPC loop stopped"
        dead = [str(worker.device) for worker in self.workers if not worker.is_alive()]
        if dead:
            return f"the worker thread of {', '.join(dead)} died"
        if not self.ready.is_set():
            return "the expert server is not ready"
        return None

    def served(self) -> list[tuple[int, float]]:
        """Per device: (training samples answered, busy seconds of its serving path)."""
        return [worker.clock.reading() for worker in self.workers]

    def is_alive(self) -> bool:
        return self._loop_thread.is_alive()

    def shutdown(self) -> None:
        """Stop declaring, answering and computing; then stop the DHT (as hivemind's Server does)."""
        self.ready.clear()
        if self.module_backends:
            stop_declaring(self)
        if self._loop is not None and self._loop_thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:  # already closed
                pass
            self._loop_thread.join(STOP_TIMEOUT)
        for worker in self.workers:
            worker.stop()
        self.dht.shutdown()

    def join(self, timeout: float | None = None) -> None:
        self._loop_thread.join(timeout)
        for worker in self.workers:
            if worker.ident is not None:
                worker.join(timeout)
