"""The experts as backends: one counted, pausable, throttled, checkpointable ``ModuleBackend`` per uid.

``CountingBackend.forward``/``backward`` compute a batch, apply the optimizer (backward), count the
samples into ``counters.ExpertCounters``, refuse while paused and idle for the power duty cycle. Two
serving paths call them:

- lean (the default, ``serving.handler``): the RPC arrives on this process's event loop, is checked
  (``malformed``) and queued on the worker thread of its device (``serving.batching``), which batches
  and calls the backend: no other process, no shared-memory copy.
- hivemind (``serving = "hivemind"``, ``VolunteerServer`` below): a hivemind ConnectionHandler process
  receives the call and queues it in the expert's ``CheckedTaskPool`` (the same checks, in that
  process); the Runtime thread of the expert's device batches the queue (``DeviceRuntimes``: one per
  device) and calls the backend.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
import zlib
from functools import partial
from typing import Mapping, Sequence

import numpy as np
import torch
from hivemind.moe import Server
from hivemind.moe.server.dht_handler import DHTHandlerThread
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime
from hivemind.moe.server.task_pool import TaskPool
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.nested import nested_flatten, nested_pack
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from volunteer.core.manifest import Manifest
from volunteer.core.wire import compression
from volunteer.serving.activations import MAX_STALENESS, KeptForwards, Rows
from volunteer.serving.checkpoints import CheckpointStore, ExpertCheckpoint
from volunteer.serving.counters import ExpertCounters
from volunteer.serving.experts import build_expert, build_optimizer, sample_input
from volunteer.serving.served import ServedClock


class CheckedTaskPool(TaskPool):
    """Refuses a malformed request in the ConnectionHandler process, before it is queued.

    hivemind checks nothing: a wrong shape or dtype from a remote peer reached the expert (or made
    ``torch.cat`` kill the pool's batching loop, so the expert hung until restart), an empty batch
    waited forever, and NaN gradients reached the optimizer and poisoned the weights."""

    def __init__(self, process_func, *, schema, trains: bool, **kwargs):
        super().__init__(process_func, **kwargs)
        self.schema = tuple(schema)
        self.trains = trains  # a backward pool: its answered samples are training samples
        self.clock: ServedClock | None = None  # its device's, set by VolunteerServer before the handlers fork

    def submit_task(self, *args: torch.Tensor):
        problem = malformed(args, self.schema)
        if problem is not None:
            future = MPFuture()
            future.set_exception(ValueError(f"{self.name}: {problem}"))
            return future
        if self.clock is None:
            return super().submit_task(*args)
        # timed from here (the handler process, request read) to the answer: the path a trainer waits on
        self.clock.begin()
        future = super().submit_task(*args)
        rows = args[0].shape[0] if self.trains else 0
        future.add_done_callback(lambda done: self.clock.end(0 if done.cancelled() or done.exception() else rows))
        return future


def malformed(tensors: Sequence[torch.Tensor], schema: Sequence[BatchTensorDescriptor]) -> str | None:
    """Why ``tensors`` do not fit ``schema`` (batch first), or None if they do."""
    if len(tensors) != len(schema):
        return f"expected {len(schema)} tensors, got {len(tensors)}"
    rows = None
    for i, (tensor, descr) in enumerate(zip(tensors, schema)):
        if not isinstance(tensor, torch.Tensor):
            return f"argument {i} is not a tensor"
        if tensor.dim() != len(descr.size) or tuple(tensor.shape[1:]) != tuple(descr.size[1:]):
            return (f"tensor {i} has shape {tuple(tensor.shape)}, expected "
                    f"(batch, {', '.join(map(str, descr.size[1:]))})")
        if tensor.dtype != descr.dtype:
            return f"tensor {i} is {tensor.dtype}, expected {descr.dtype}"
        if rows is not None and tensor.shape[0] != rows:
            return "tensors differ in batch size"
        rows = tensor.shape[0]
        if tensor.is_floating_point() and not _all_finite(tensor):
            return f"tensor {i} holds NaN or infinite values"
    return "empty batch" if not rows else None


def _all_finite(tensor: torch.Tensor) -> bool:
    """One reduction instead of a mask as large as the tensor: a NaN or infinity makes the sum
    non-finite; a finite tensor whose sum overflows is checked exactly.

    On the CPU the sum is NumPy's, on the calling thread: this runs on the event loop, and torch's
    reduction there started a second OpenMP team next to the device worker's, which on 2 busy cores
    spun against it (12% of the lean volunteer's samples under load, for ~1% of its work)."""
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_FLOATS:
        array = tensor.detach().numpy()
        with np.errstate(all="ignore"):  # an overflowing or NaN sum is an answer here, not a warning
            total = np.add.reduce(array, axis=None)
        return bool(np.isfinite(total)) or bool(np.isfinite(array).all())
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


class Paused(RuntimeError):
    """Raised to a remote caller while the volunteer is paused: its trainer routes to other servers."""


class QuietPauses(logging.Filter):
    """Drops hivemind's Runtime log of a ``Paused`` refusal.

    The Runtime logs every exception a backend raises as ERROR with its traceback ("Caught ...,
    attempting to recover"), so a deliberate ``volunteer pause`` wrote a 13-line error per expert and
    showed as errors on the dashboard. The caller still gets the refusal; only the log line goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], Paused))


RUNTIME_LOGGER = logging.getLogger("hivemind.moe.server.runtime")
RUNTIME_LOGGER.addFilter(QuietPauses())


class CountingBackend(ModuleBackend):
    """A ModuleBackend that counts the work it does, can be paused and throttled, and snapshotted."""

    def __init__(self, name: str, module: torch.nn.Module, *, expert_type: str, counters: ExpertCounters,
                 duty_cycle: float = 1.0, pools: bool = True, **kwargs):
        super().__init__(name, module, **kwargs)
        self.max_batch_size = kwargs["max_batch_size"]
        self.steps = 0  # optimizer steps taken by this backend: how stale a kept forward is
        self.max_staleness = MAX_STALENESS  # optimizer steps a kept forward may be behind its backward
        self._weights: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, its copy): _step_weights
        self.inputs_count = len(tuple(nested_flatten(self.forward_schema)))
        if not pools:  # the lean path (serving.handler) batches in its device worker: no TaskPool processes
            self.forward_pool = self.backward_pool = None
            # and keeps each forward's graph for its backward (hivemind's backward recomputes it)
            self.kept: KeptForwards | None = KeptForwards(self.max_batch_size)
        else:
            self._checked_pools(name)
            self.kept = None  # hivemind's Runtime calls forward and backward in any order: recompute
        self.expert_type, self.counters = expert_type, counters
        # the Runtime thread mutates weights in backward; checkpoints copy them under the same lock
        self.lock = threading.Lock()
        self.paused = threading.Event()
        self.duty_cycle = duty_cycle  # share of wall time spent computing (power level light/medium/full)

    def _checked_pools(self, name: str) -> None:
        pool = dict(min_batch_size=self.forward_pool.min_batch_size, max_batch_size=self.forward_pool.max_batch_size,
                    timeout=self.forward_pool.timeout)
        self.forward_pool = CheckedTaskPool(self.forward, name=f"{name}_forward", trains=False,
                                            schema=nested_flatten(self.forward_schema), **pool)
        self.backward_pool = CheckedTaskPool(self.backward, name=f"{name}_backward", trains=True,
                                             schema=nested_flatten(self.backward_schema), **pool)

    def forward(self, *inputs: torch.Tensor, parts: Sequence[Rows] | None = None) -> tuple[torch.Tensor, ...]:
        """``parts``: the rows of each request the device worker batched together (for the kept graphs)."""
        if self.kept is None:
            return self._counted("forward", super().forward, inputs)
        return self._counted("forward", partial(self._forward_kept, parts=parts), inputs)

    def backward(self, *inputs: torch.Tensor, parts: Sequence[Rows] | None = None) -> tuple[torch.Tensor, ...]:
        if self.kept is None:
            return self._counted("backward", super().backward, inputs)
        return self._counted("backward", partial(self._backward_kept, parts=parts), inputs)

    def _forward_kept(self, *inputs: torch.Tensor, parts: Sequence[Rows] | None) -> tuple[torch.Tensor, ...]:
        """hivemind's forward, with autograd on: the graph is kept for the backward of the same inputs."""
        if inputs[0].shape[0] == 0:
            raise RuntimeError("Batch should contain more than 0 samples")
        weights = self._step_weights()
        leaves, outputs = self._graph(inputs, weights)
        if all(output.requires_grad for output in outputs):
            self.kept.keep(leaves, outputs, self.steps, parts, weights)
        return tuple(output.detach() for output in outputs)

    def _step_weights(self) -> dict[str, torch.Tensor]:
        """This step's weights as leaves of their own, copied once a step: the kept graphs hold them, so
        the optimizer's in-place steps leave those graphs intact."""
        if self._weights is None or self._weights[0] != self.steps:
            self._weights = (self.steps, {name: p.detach().clone().requires_grad_(p.requires_grad)
                                          for name, p in self.module.named_parameters()})
        return self._weights[1]

    def _graph(self, inputs: Sequence[torch.Tensor], weights: Mapping[str, torch.Tensor] | None = None
               ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """The module's forward with autograd on (on ``weights`` if given, else the live ones), from fresh
        leaves of ``inputs``: (leaves, flat outputs)."""
        leaves = [t.detach().requires_grad_(True) if t.is_floating_point() else t.detach() for t in inputs]
        args, kwargs = nested_pack(leaves, structure=self.forward_schema)
        with torch.enable_grad():
            if weights is None:
                return leaves, tuple(nested_flatten(self.module(*args, **kwargs)))
            return leaves, tuple(nested_flatten(torch.func.functional_call(self.module, weights, tuple(args), kwargs)))

    def _backward_kept(self, *inputs: torch.Tensor, parts: Sequence[Rows] | None) -> tuple[torch.Tensor, ...]:
        """One optimizer step over the batch, as hivemind's backward, but each request's forward comes from
        its kept graph where one matches; the rest are recomputed. No match at all: hivemind's own backward.

        A kept graph may also hold requests whose backward is not in this batch: their rows get zero
        gradients here (nothing of theirs reaches the weights), and the graph is retained for their own
        backward, within ``MAX_STALENESS`` steps."""
        count, rows = self.inputs_count, inputs[0].shape[0]
        args, grad_outputs = inputs[:count], inputs[count:]
        parts = tuple(parts or ((0, rows),))
        since = self.steps - self.max_staleness
        found = [self.kept.take([t[start:stop] for t in args], since) for start, stop in parts]
        if not any(found):
            return super().backward(*inputs)
        roots, root_grads = [], []  # what autograd starts from
        sources: list[tuple[Sequence[torch.Tensor], int, int]] = [None] * len(parts)  # part -> (leaves, rows)
        by_graph: dict[int, list[int]] = {}
        for i, match in enumerate(found):
            if match is not None:
                by_graph.setdefault(id(match[0]), []).append(i)
        for indices in by_graph.values():
            kept = found[indices[0]][0]
            roots.extend(kept.outputs)
            root_grads.extend(_scatter(kept, [(found[i][1], parts[i]) for i in indices], grad_outputs))
            for i in indices:
                sources[i] = (kept.inputs, *found[i][1])
        missing = [i for i, match in enumerate(found) if match is None]
        if missing:  # recomputed together, as hivemind would, inside the same step
            leaves, outputs = self._graph([_rows_of(t, [parts[i] for i in missing]) for t in args])
            roots.extend(outputs)
            root_grads.extend(_rows_of(g, [parts[i] for i in missing]) for g in grad_outputs)
            offset = 0
            for i in missing:
                size = parts[i][1] - parts[i][0]
                sources[i] = (leaves, offset, offset + size)
                offset += size
        if len(root_grads) != len(roots):  # the schema check makes this unreachable from the wire
            raise ValueError(f"{self.name}: {len(root_grads)} output gradients for {len(roots)} outputs")
        used = {id(match[0]): match[0] for match in found if match is not None}.values()
        for kept in used:  # fresh input gradients: a retained graph's earlier ones went to their callers
            for leaf in kept.inputs:
                leaf.grad = None
        # a graph that still holds requests waiting for their backward must survive this one
        retain = any(len(kept.taken) < len(kept.parts) for kept in used)
        torch.autograd.backward(roots, grad_tensors=root_grads, retain_graph=retain)
        self._gather_grads({id(kept.weights): kept.weights for kept in used})
        self.on_backward(rows)
        grads = [[_grad(leaf)[start:stop] for leaf in leaves] for leaves, start, stop in sources]
        return tuple(pieces[0] if len(pieces) == 1 else torch.cat(pieces) for pieces in zip(*grads))

    def _gather_grads(self, copies: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Add the gradients that the kept graphs left on their weight copies to the live weights' (the
        optimizer steps those), and reset the copies' for the next backward of their step."""
        for weights in copies.values():
            for name, param in self.module.named_parameters():
                grad, weights[name].grad = weights[name].grad, None
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad + grad

    def on_backward(self, batch_size: int) -> None:
        super().on_backward(batch_size)
        self.steps += 1
        if self.kept is not None:  # the graphs too stale to use, and their weight copies, go
            self.kept.drop_before(self.steps - self.max_staleness)

    def _counted(self, kind: str, compute, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self.paused.is_set():  # fail fast: the owner wants the machine back now
            raise Paused(f"{self.name} is paused by its volunteer")
        start = time.perf_counter()
        with self.lock:
            results = compute(*inputs)
        seconds = time.perf_counter() - start
        self.counters.record(kind, inputs[0].shape[0], seconds)
        if self.duty_cycle < 1.0:
            # idle in proportion to the work done: the Runtime thread runs one batch at a time,
            # so this caps the share of the device the volunteer takes
            time.sleep(seconds * (1.0 / self.duty_cycle - 1.0))
        return results

    def to_checkpoint(self) -> ExpertCheckpoint:
        with self.lock:
            module = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
            # copied straight to host memory: a deepcopy on the GPU would need the optimizer state twice there
            optimizer = _to_cpu(self.optimizer.state_dict()) if self.optimizer is not None else None
        return ExpertCheckpoint(self.name, self.expert_type, module, optimizer, self.counters.snapshot().optimizer_steps)


def _scatter(kept, spans, grad_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of a kept graph's outputs: each request's rows from the batch's ``grad_outputs``
    (``spans``: its rows in the graph, its rows in the batch), zero for the requests not in the batch."""
    if len(spans) == 1 and spans[0][0] == (0, kept.rows) and len(kept.parts) == 1:
        (_, (start, stop)), = spans
        return [grad[start:stop] for grad in grad_outputs]
    full = [torch.zeros_like(output) for output in kept.outputs]
    for (to_start, to_stop), (start, stop) in spans:
        for target, grad in zip(full, grad_outputs):
            target[to_start:to_stop] = grad[start:stop]
    return full


def _rows_of(tensor: torch.Tensor, parts: Sequence[Rows]) -> torch.Tensor:
    if len(parts) == 1:
        return tensor[parts[0][0]:parts[0][1]]
    return torch.cat([tensor[start:stop] for start, stop in parts])


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.grad if isinstance(leaf.grad, torch.Tensor) else torch.zeros_like(leaf)


def _to_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return state


def initial_seed(uid: str) -> int:
    """A fresh expert's weights depend only on its uid, so every server of a uid starts the same."""
    return zlib.crc32(uid.encode())


def build_backends(
    manifest: Manifest, uids: Sequence[str], max_batch_size: int, store: CheckpointStore, duty_cycle: float = 1.0,
    device: str = "cpu", pools: bool = True, backend_class: type[CountingBackend] = CountingBackend,
) -> tuple[dict[str, CountingBackend], list[str]]:
    """Build one backend per uid on ``device``, restoring each from its checkpoint when one is readable.
    ``backend_class``: ``versions.AuditedBackend`` for a volunteer whose answers can be audited.

    ``pools=False`` for the lean path (``serving.handler``), which needs no hivemind TaskPools.
    Returns the backends and the uids that were restored."""
    backends, restored = {}, []
    for uid in uids:
        expert_type = manifest.expert_type_of(uid)
        module = build_expert(expert_type.block, manifest.d_model, expert_type.d_hidden, seed=initial_seed(uid))
        optimizer = build_optimizer(manifest.optimizer.name, module.parameters(), lr=manifest.optimizer.lr)
        checkpoint = store.load(uid, expert_type.name)
        sample = sample_input(expert_type.block, 1, manifest.d_model)
        # the manifest's wire dtype in both schemas: hivemind's clients and servers (ours too) serialize
        # inputs, outputs and gradients with the compression their schema names
        args_schema, outputs_schema = wire_schemas(module, sample, compression(manifest.wire_dtype))
        # built on the CPU: hivemind runs a dummy forward on CPU zeros to learn the output schema
        backends[uid] = backend_class(
            uid, module, optimizer=optimizer, expert_type=expert_type.name,
            counters=ExpertCounters(uid, expert_type.name, checkpoint.updates if checkpoint else 0,
                                   params=expert_type.num_params(manifest.d_model)),
            args_schema=args_schema, outputs_schema=outputs_schema,
            min_batch_size=1, max_batch_size=max_batch_size, duty_cycle=duty_cycle, pools=pools,
        )
        # then moved, before the optimizer state is loaded: load_state_dict puts that state on its
        # parameters' device, and Adam's step fails on state left on the CPU next to GPU weights
        module.to(device)
        if checkpoint is not None:
            module.load_state_dict(checkpoint.module)
            if checkpoint.optimizer is not None:
                optimizer.load_state_dict(checkpoint.optimizer)
                for group in optimizer.param_groups:  # the manifest's rate wins over the one saved
                    group["lr"] = manifest.optimizer.lr
            restored.append(uid)
    return backends, restored


def wire_schemas(module: torch.nn.Module, sample: torch.Tensor, wire: int
                 ) -> tuple[tuple[BatchTensorDescriptor, ...], BatchTensorDescriptor]:
    """An expert's input and output schemas with the wire compression ``wire`` (hivemind's
    ``CompressionType``): the inputs' covers inputs and input gradients, the output's covers outputs
    and output gradients."""
    with torch.no_grad():
        output = module(torch.zeros_like(sample))
    return (BatchTensorDescriptor.from_tensor(sample, wire),), BatchTensorDescriptor.from_tensor(output, wire)


class ServerStartError(RuntimeError):
    """hivemind's server did not come up; one line, the details are in the log."""


class DeviceRuntimes:
    """One hivemind ``Runtime`` thread per device, each batching the pools of the experts placed there.

    hivemind's Server runs one Runtime for all its experts on one device. With one per GPU the GPUs
    compute at once (torch releases the GIL inside kernels) and no batch waits for another GPU's. It
    stands in for ``Server.runtime``: ``run`` in the server's thread, ``ready``, ``shutdown``."""

    def __init__(self, groups: Sequence[tuple[str, Mapping[str, ModuleBackend]]], **runtime_kwargs):
        self.runtimes = tuple(
            Runtime(dict(backends), device=torch.device(device), **runtime_kwargs) for device, backends in groups
        )
        self.ready = mp.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        for runtime in self.runtimes:
            runtime.start()
        try:
            while not all(runtime.ready.wait(0.05) for runtime in self.runtimes):
                if not all(runtime.is_alive() for runtime in self.runtimes):
                    return  # one failed to start: stop the others too
            self.ready.set()
            # one dead runtime would leave its experts declared but never answering: stop serving
            while all(runtime.is_alive() for runtime in self.runtimes) and not self._stop.wait(0.5):
                pass
        finally:
            self.shutdown()
            for runtime in self.runtimes:
                runtime.join(timeout=30)

    def shutdown(self) -> None:
        self.ready.clear()
        self._stop.set()
        for runtime in self.runtimes:
            if not runtime.shutdown_trigger.is_set():
                runtime.shutdown()


class VolunteerServer(Server):
    """hivemind's Server, announcing its experts only once its connection handlers accept calls, and
    computing on each expert's own device (``placed``: one (torch device, uids) pair per device).

    hivemind starts declaring first: a trainer that found the expert at once got "protocols not
    supported: ConnectionHandler.rpc_info" and dropped it for its eviction period."""

    def __init__(self, dht, module_backends: dict[str, ModuleBackend], placed: Sequence[tuple[str, Sequence[str]]],
                 **kwargs):
        if len(placed) <= 1:  # one device: hivemind's own Runtime, as it always was
            device = placed[0][0] if placed else "cpu"
            super().__init__(dht, module_backends, device=torch.device(device), **kwargs)
        else:
            super().__init__(dht, module_backends, **kwargs)
            self.runtime = DeviceRuntimes(
                [(device, {uid: module_backends[uid] for uid in uids}) for device, uids in placed]
            )
        # one served clock per device, in shared memory: the connection handlers, forked in run(), time
        # each request from its arrival to its answer (what the node announces, as on the lean path)
        self.clocks = [ServedClock.shared() for _ in placed]
        for clock, (_, uids) in zip(self.clocks, placed):
            for pool in (pool for uid in uids for pool in module_backends[uid].get_pools()):
                if isinstance(pool, CheckedTaskPool):
                    pool.clock = clock

    def run(self) -> None:
        if not self.dht.is_alive():
            self.dht.run_in_background(await_ready=True)
        for handler in self.conn_handlers:
            handler.run_in_background(await_ready=True)
        if self.module_backends:
            self.dht_handler_thread.start()
        try:
            self.runtime.run()
        finally:
            self.shutdown()

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """Start; with ``await_ready``, wait until it serves, and fail at once if it stopped instead."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while await_ready and not self.ready.wait(0.1):
            if not self.is_alive():
                raise ServerStartError("the expert server stopped while starting (its error is in the log)")
            if deadline is not None and time.monotonic() > deadline:
                raise ServerStartError(f"the expert server was not ready after {timeout:.0f} s")

    def served(self) -> list[tuple[int, float]]:
        """Per device: (training samples answered, busy seconds of its serving path)."""
        return [clock.reading() for clock in self.clocks]

    def failure(self) -> str | None:
        """What stopped working in hivemind's machinery, or None while it serves (the node's health check)."""
        # the server first: when a runtime dies, hivemind's cleanup stops the DHT and handlers too
        if not self.is_alive():
            return "hivemind's server thread stopped"
        if not self.ready.is_set():
            return "hivemind's expert runtime stopped"
        dead = [str(h.pid) for h in self.conn_handlers if not h.is_alive()]
        if dead:  # seen here: with one of two handlers dead, every call to the node hung
            return f"connection handler process {', '.join(dead)} died"
        # the Runtime waits on a dead pool's pipe for ever: its expert hangs while the rest serve
        dead = [f"{pool.name} (pid {pool.pid})" for pool in task_pools(self.module_backends.values())
                if not pool.is_alive()]
        if dead:
            return f"task pool process {', '.join(dead)} died"
        return None

    def shutdown(self) -> None:
        """hivemind's shutdown, without waiting for ever on a declaration the DHT will never answer."""
        self.ready.clear()
        for handler in self.conn_handlers:
            handler.shutdown()
        if self.module_backends:
            stop_declaring(self)
        self.dht.shutdown()
        self.runtime.shutdown()


DECLARE_JOIN_TIMEOUT = 30.0  # a declaration in flight: hivemind's DHT calls have no timeout of their own


def stop_declaring(server: Server) -> None:
    """Stop re-announcing the server's experts (pause, drain); the records then expire on their own."""
    thread = server.dht_handler_thread
    thread.stop.set()
    if thread.ident is not None:  # hivemind starts it only once the handlers are up
        # on a dead DHT a declaration in flight never returns: the thread is a daemon, leave it
        thread.join(timeout=DECLARE_JOIN_TIMEOUT if server.dht.is_alive() else 1.0)


def resume_declaring(server: Server) -> None:
    """Announce the experts again now and every update period (hivemind's thread cannot be restarted)."""
    old = server.dht_handler_thread
    if old.ident is not None:  # its stop event is set: it ends within one declaration
        old.join(timeout=30)
    if old.is_alive():
        return
    server.dht_handler_thread = DHTHandlerThread(
        module_backends=server.module_backends, dht=server.dht, update_period=old.update_period,
        expiration=old.expiration, daemon=True,
    )
    server.dht_handler_thread.start()


def task_pools(backends) -> list:
    """hivemind's TaskPool processes (a forward and a backward one per expert) that were started: none
    on the lean path, which builds the same backends but never starts their pools."""
    pools = (pool for backend in backends for pool in (backend.forward_pool, backend.backward_pool))
    return [pool for pool in pools if pool is not None and pool.pid is not None]
