"""A Mixture-of-Experts layer whose experts live on the swarm, called in one batch per expert per step.

hivemind's ``RemoteMixtureOfExperts`` sends one RPC per sample per expert, which for a token-level
language model (``batch x seq_len`` samples a step) is far too slow. ``BatchedRemoteMoE`` instead:

1. keeps the live experts of its layer (``LiveExperts``: ``get_experts`` refreshed in the background,
   minus experts that failed recently);
2. gates locally over the full grid of uids (fixed-size logits, so the gate's parameters never depend
   on who is alive), masked to the live experts, top-k per token, softmax over the chosen k;
3. groups the tokens routed to each expert and sends each chosen expert one forward call and, in
   backward, one backward call per step, all experts concurrently, each bounded by a timeout;
4. tolerates failures like hivemind does: an expert that fails, times out or answers garbage is dropped
   for the step and its tokens' weights renormalised over the experts that answered (a token nobody
   answered gets zero output, so a residual model passes it through); in backward a failed expert gives
   zero gradient for its inputs. A failing expert is evicted from the live set for a while.

The RPCs are hivemind's own (``expert_forward`` / ``expert_backward`` on the server stub), run on
hivemind's ``RemoteExpertWorker`` event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import torch
from hivemind import DHT
from hivemind.moe.client.expert import (
    RemoteExpert,
    create_remote_experts,
    expert_backward,
    expert_forward,
    get_server_stub,
)
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.proto import runtime_pb2
from torch import nn
from torch.autograd.function import once_differentiable

from coordinator_seeds.timeouts import CallTimeouts
from volunteer.core.dht_calls import active_successors, expert_info, get_experts
from volunteer.core.manifest import MoELayer
from volunteer.core.wire import NONE, Sent, serialize

LATEST = float("inf")  # get_experts: search the DHT for the newest record instead of trusting the cache
logger = logging.getLogger("coordinator_seeds.dispatch")

FORWARD, BACKWARD = 0, 1  # indices into BatchedRemoteMoE.answered's pairs

# Seconds beyond an RPC's own timeout that we wait for the event loop itself before giving up on it.
_LOOP_GRACE = 5.0

# A server the p2p daemon cannot route to (``routing: not found``: not dialable, and no connection of its
# own to us yet) fails at once, so retrying it costs a step nothing; a NATed volunteer dials the trainer
# within seconds of joining, and a 30 s eviction would keep it idle that long after it did.
UNROUTABLE_EVICTION = 5.0
COUNTS_LOCK = threading.Lock()  # several micro-batches in flight record their answers at once


# --- which experts are alive ---------------------------------------------------------------------


class LiveExperts:
    """The experts of one layer that the DHT lists, minus those evicted after a failure.

    ``current()`` never waits for the DHT once a first list exists: a stale list starts a background
    refresh and the next call picks its result up. Eviction is keyed by ``(uid, server peer)`` and lasts
    ``evict_for`` seconds: a dead server's DHT record outlives it (hivemind keeps it for twice the
    server's update period), and re-admitting it at every refresh would cost a timeout each time, while a
    new server taking the uid over is admitted at the next refresh.
    """

    def __init__(
        self,
        dht: DHT,
        uids: Sequence[str],
        *,
        refresh_period: float = 15.0,
        evict_for: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.dht, self.uids = dht, list(uids)
        self.refresh_period, self.evict_for, self.clock = refresh_period, evict_for, clock
        self._found: dict[int, RemoteExpert] = {}  # grid index -> expert, as the DHT last said
        self._evicted: dict[tuple[str, str], float] = {}  # (uid, peer id) -> evicted until
        self._pending: concurrent.futures.Future | None = None
        self._started_at = -math.inf  # when the latest lookup was started
        self._lock = threading.Lock()

    def current(self) -> dict[int, RemoteExpert]:
        """Live experts by grid index; the first call waits (bounded) for a lookup."""
        with self._lock:
            if self._started_at == -math.inf:  # nothing known yet: worth waiting for, once
                self._start_lookup()
                self._collect(wait=10.0)
            self._collect(wait=0.0)
            if self.clock() - self._started_at >= self.refresh_period and self._pending is None:
                self._start_lookup()
            return self._alive()

    def refresh(self, timeout: float = 10.0) -> dict[int, RemoteExpert]:
        """Look the layer up now and wait for the answer (for start-up, not the training loop)."""
        with self._lock:
            if self._pending is None:
                self._start_lookup()
            self._collect(wait=timeout)
            return self._alive()

    def evict(self, expert: RemoteExpert, seconds: float | None = None) -> None:
        with self._lock:
            self._evicted[expert.uid, str(expert.peer_id)] = self.clock() + (seconds or self.evict_for)

    def _start_lookup(self) -> None:
        # A blocking get_experts in a thread of our own: hivemind's return_future=True path awaits an
        # MPFuture bound to the calling thread's event loop, and fails once that loop is gone.
        future: concurrent.futures.Future = concurrent.futures.Future()

        def lookup() -> None:
            try:
                # the latest record, not a cached one: a server that withdrew must drop out at once
                future.set_result(get_experts(self.dht, self.uids, latest=True))  # in bounded batches
            except BaseException as e:  # handed to whoever collects the result
                future.set_exception(e)

        threading.Thread(target=lookup, name=f"lookup {self.uids[0]}", daemon=True).start()
        self._pending, self._started_at = future, self.clock()

    def _collect(self, wait: float) -> None:
        if self._pending is None:
            return
        try:
            found = self._pending.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            return  # still running; keep the list we have
        except Exception as e:  # a failed lookup must not stop training: keep the old list, retry later
            logger.warning("expert lookup for %s failed: %s", self.uids[0].split(".", 1)[0], e)
        else:
            self._found = {i: expert for i, expert in enumerate(found) if expert is not None}
        self._pending = None

    def _alive(self) -> dict[int, RemoteExpert]:
        now = self.clock()
        self._evicted = {key: until for key, until in self._evicted.items() if until > now}
        return {i: e for i, e in self._found.items() if (e.uid, str(e.peer_id)) not in self._evicted}


# --- calling experts -----------------------------------------------------------------------------


_Rpc = Callable[[str, Sequence[torch.Tensor], Any, Any], Awaitable[list[torch.Tensor]]]


def call_experts(
    requests: Sequence[tuple[RemoteExpert, Sequence[Sent]]], rpc: _Rpc, timeout: float,
    observe: Callable[[float], None] | None = None, wire: int = NONE,
) -> list[list[torch.Tensor] | BaseException]:
    """Run ``rpc`` (``expert_forward`` or ``expert_backward``) for every request concurrently; each
    result is the expert's tensors, or the exception (a ``TimeoutError`` after ``timeout`` seconds).
    Tensors are serialized with ``wire`` (the experiment's compression); a request may hold tensors
    serialized already (``wire.serialize``: a caller that keeps what the server reads, for audits).
    ``observe`` is given the seconds each call that answered took."""

    async def one(expert: RemoteExpert, tensors: Sequence[Sent], serialized: list[runtime_pb2.Tensor]
                  ) -> list[torch.Tensor]:
        started = time.perf_counter()
        stub = get_server_stub(expert.p2p, expert.peer_id)
        result = await asyncio.wait_for(rpc(expert.uid, tensors, serialized, stub), timeout)
        if observe is not None:
            observe(time.perf_counter() - started)
        return result

    # serialized here, in the caller's thread: the event loop is one thread for every micro-batch in flight
    prepared = [(expert, tensors, [serialize(t, wire) if isinstance(t, torch.Tensor) else t for t in tensors])
                for expert, tensors in requests]

    async def everyone() -> list[Any]:
        return await asyncio.gather(*(one(*request) for request in prepared), return_exceptions=True)

    if not requests:
        return []
    future = RemoteExpertWorker.run_coroutine(everyone(), return_future=True)
    try:
        return future.result(timeout=timeout + _LOOP_GRACE)
    except concurrent.futures.TimeoutError:  # the loop itself is stuck: count every call as failed
        future.cancel()
        return [TimeoutError("expert calls did not finish")] * len(requests)


def checked_output(result: list[torch.Tensor] | BaseException, shape: torch.Size) -> torch.Tensor | None:
    """The single tensor an expert returned, or None if it failed or sent the wrong shape or non-finite
    values (either would corrupt every token it touches)."""
    if isinstance(result, BaseException) or len(result) != 1:
        return None
    (tensor,) = result
    if tensor.shape != shape or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        return None
    return tensor


def shutdown_dht(dht: DHT, timeout: float = 5.0) -> None:
    """Shut ``dht`` down, closing first the RPC client that expert calls opened on it.

    ``get_experts`` gives every expert the DHT's P2P replica, a client of the p2p daemon whose reader and
    writer tasks run on hivemind's ``RemoteExpertWorker`` loop. Left to the garbage collector, its
    finalizer runs in whatever thread drops it last, finds no event loop there and raises; closing it
    on its own loop first leaves the finalizer nothing to do.
    """
    replica = getattr(dht, "_p2p_replica", None)  # hivemind 1.1.12 keeps the replica private

    async def close() -> None:
        await replica.shutdown()
        for _ in range(3):  # let the cancelled tasks run to their end
            await asyncio.sleep(0)

    try:
        if replica is not None:
            RemoteExpertWorker.run_coroutine(close(), return_future=True).result(timeout=timeout)
    except (concurrent.futures.TimeoutError, RuntimeError) as e:
        logger.debug("closing the DHT's P2P replica failed: %s", e)
    finally:
        dht.shutdown()


# --- the batched call as an autograd function -----------------------------------------------------


@dataclass(frozen=True)
class ExpertCall:
    """One RPC of a step: the tokens routed to one expert, and which of their k choices it is."""

    expert: RemoteExpert
    tokens: torch.Tensor  # int64 [n], rows of the flattened input
    slots: torch.Tensor  # int64 [n], in [0, k)


def plan_calls(chosen: torch.Tensor, experts: dict[int, RemoteExpert], max_batch_size: int) -> list[ExpertCall]:
    """Group tokens by chosen expert; a group larger than a server's batch limit is split."""
    calls = []
    for index in chosen.unique().tolist():
        tokens, slots = (chosen == index).nonzero(as_tuple=True)
        for start in range(0, len(tokens), max_batch_size):
            part = slice(start, start + max_batch_size)
            calls.append(ExpertCall(experts[index], tokens[part], slots[part]))
    return calls


class _BatchedRemoteCall(torch.autograd.Function):
    """``x [N, d] -> (outputs [N, k, d], answered bool [N, k])``; failed calls leave zeros and False."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, calls: list[ExpertCall], k: int, layer: BatchedRemoteMoE) -> Any:
        inputs = x.detach().cpu()
        timeouts = layer.timeouts[FORWARD]
        results = call_experts([(c.expert, [inputs[c.tokens]]) for c in calls], expert_forward, timeouts.current(),
                               timeouts.observe, layer.wire)
        outputs = torch.zeros(len(inputs), k, inputs.shape[1])
        answered = torch.zeros(len(inputs), k, dtype=torch.bool)
        ok = []
        for call, result in zip(calls, results):
            output = checked_output(result, torch.Size((len(call.tokens), inputs.shape[1])))
            if layer.record(call, output is not None, result, FORWARD):
                outputs[call.tokens, call.slots] = output
                answered[call.tokens, call.slots] = True
                ok.append(call)
        ctx.save_for_backward(inputs)
        ctx.calls, ctx.layer = ok, layer  # only experts that answered forward are asked for backward
        ctx.mark_non_differentiable(answered)
        return outputs.to(x.device, x.dtype), answered.to(x.device)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_outputs: torch.Tensor, _grad_answered: Any) -> Any:
        (inputs,) = ctx.saved_tensors
        grads, calls, layer = grad_outputs.cpu().float(), ctx.calls, ctx.layer
        requests = [(c.expert, [inputs[c.tokens], grads[c.tokens, c.slots].contiguous()]) for c in calls]
        timeouts = layer.timeouts[BACKWARD]
        results = call_experts(requests, expert_backward, timeouts.current(), timeouts.observe, layer.wire)
        grad_inputs = torch.zeros_like(inputs)
        for call, result in zip(calls, results):
            grad = checked_output(result, torch.Size((len(call.tokens), inputs.shape[1])))
            if layer.record(call, grad is not None, result, BACKWARD):
                grad_inputs.index_add_(0, call.tokens, grad)
        return grad_inputs.to(grad_outputs.device, grad_outputs.dtype), None, None, None


# --- the layer -----------------------------------------------------------------------------------


class BatchedRemoteMoE(nn.Module):
    """``[..., d_model] -> [..., d_model]``: the weighted sum of the top-k live experts per token.

    Counters for logs: ``calls_ok`` / ``calls_failed`` count RPCs (forward and backward), and
    ``last_live_count`` is how many experts were live after the latest forward's failures.
    ``answered`` is the work each server did for us, as we saw it: peer id -> [forward samples,
    backward samples] of well-formed answers (the leaderboard's verified contributions).
    """

    # how its calls serialize activations and gradients (``volunteer.core.wire``): the manifest's wire
    # dtype, set by the model that owns the layer, as the volunteers' schemas declare it
    wire: int = NONE

    def __init__(
        self,
        d_model: int,
        layer: MoELayer,
        dht: DHT,
        k_best: int,
        forward_timeout: float = 10.0,
        backward_timeout: float = 10.0,
        *,
        max_batch_size: int = 4096,
        refresh_period: float = 15.0,
        evict_for: float = 30.0,
    ):
        super().__init__()
        self.layer, self.k_best, self.max_batch_size = layer, k_best, max_batch_size
        self.forward_timeout, self.backward_timeout = forward_timeout, backward_timeout
        # by direction (FORWARD, BACKWARD): the configured timeouts are ceilings, the calls seen set the bound
        self.timeouts = (CallTimeouts(forward_timeout), CallTimeouts(backward_timeout))
        self.live = LiveExperts(dht, layer.uids(), refresh_period=refresh_period, evict_for=evict_for)
        self.gate = nn.Linear(d_model, len(layer.uids()))
        self.calls_ok = self.calls_failed = self.last_live_count = 0
        self.answered: dict[str, list[int]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        experts = self.live.current()
        if not experts or len(flat) == 0:
            self.last_live_count = len(experts)
            return torch.zeros_like(x)
        logits = self.gate(flat)
        chosen = self.route(logits.detach(), experts)
        calls = plan_calls(chosen, experts, self.max_batch_size)
        outputs, answered = _BatchedRemoteCall.apply(flat, calls, chosen.shape[1], self)
        self.last_live_count = len(self.live.current())
        weights = renormalized_weights(logits.gather(1, chosen), answered)
        return (weights.unsqueeze(-1) * outputs).sum(dim=1).reshape(x.shape)

    def route(self, logits: torch.Tensor, experts: dict[int, RemoteExpert]) -> torch.Tensor:
        """Grid indices ``int64 [N, k]`` of each token's top-k live experts, best first."""
        dead = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
        dead[list(experts)] = False
        k = min(self.k_best, len(experts))
        return logits.masked_fill(dead, -math.inf).topk(k, dim=-1).indices

    def record(self, call: ExpertCall, ok: bool, result: Any, direction: int = FORWARD) -> bool:
        """Count one RPC and, if it answered, its samples; evict its expert if it failed. Returns ``ok``."""
        return self.record_outcome(str(call.expert.peer_id), len(call.tokens), ok, result, direction,
                                   evicted=call.expert, what=f"expert {call.expert.uid}")

    def record_outcome(self, peer: str, samples: int, ok: bool, result: Any, direction: int, *, evicted: Any,
                       what: str) -> bool:
        """Count one RPC to ``peer`` and, if it answered, its ``samples`` in ``answered``; if it failed,
        ``self.live.evict(evicted)``: briefly when the daemon had no route, else for ``evict_for``.
        Returns ``ok``. Shared by every layer whose ``live`` evicts what it is given (experts, replicas)."""
        with COUNTS_LOCK:
            if ok:
                self.calls_ok += 1
                self.answered.setdefault(peer, [0, 0])[direction] += samples
                return True
            self.calls_failed += 1
        reason = result if isinstance(result, BaseException) else "a malformed or non-finite answer"
        seconds = UNROUTABLE_EVICTION if unroutable(reason) else self.live.evict_for
        logger.warning("%s failed (%s); evicted for %.0f s", what, _describe(reason), seconds)
        self.live.evict(evicted, seconds)
        return False


def renormalized_weights(chosen_logits: torch.Tensor, answered: torch.Tensor) -> torch.Tensor:
    """Softmax over the chosen experts that answered; all zeros for a token nobody answered.

    Masking logits (rather than dividing probabilities by their sum) keeps gradients finite even when
    every expert of a token failed."""
    anyone = answered.any(dim=-1, keepdim=True)
    masked = chosen_logits.masked_fill(~answered, -math.inf).masked_fill(~anyone, 0.0)
    return torch.softmax(masked, dim=-1) * anyone


def unroutable(reason: BaseException | str) -> bool:
    """Whether a call failed because the p2p daemon has no route to the server (hivemind's
    ``P2PDaemonError: routing: not found``), not because the server failed or was slow."""
    return "routing: not found" in str(reason)


def _describe(reason: BaseException | str) -> str:
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}".rstrip(": ")[:200]
    return reason


# --- routing over large grids ----------------------------------------------------------------------

FLAT_GATE_MAX_UIDS = 256  # above this (on a grid of 2+ dimensions) a layer gates per dimension


def remote_moe(d_model: int, layer: MoELayer, dht: DHT, k_best: int, forward_timeout: float = 10.0,
               backward_timeout: float = 10.0, **kwargs: Any) -> BatchedRemoteMoE:
    """The MoE layer for ``layer``: a flat gate over every uid for small grids, a beam search over the
    grid's prefix records (``GridRemoteMoE``) for large ones, which a flat lookup of every uid cannot hold."""
    size = math.prod(layer.grid)
    kind = GridRemoteMoE if len(layer.grid) >= 2 and size > FLAT_GATE_MAX_UIDS else BatchedRemoteMoE
    return kind(d_model, layer, dht, k_best, forward_timeout, backward_timeout, **kwargs)


class LiveGrid:
    """The live servers of one grid as hivemind's prefix records list them, in a bounded cache.

    ``successors(prefixes)`` answers from the cache; a prefix never read is read at once (a bounded
    DHT call of at most 256 keys), a stale one is re-read in a background thread while the stale
    answer serves. The cache holds at most ``max_prefixes`` prefixes (least recently used go first), so
    a trainer's DHT work and memory are bounded by the rows its tokens reach, not by the grid.
    Eviction after a failure works as in ``LiveExperts``: by ``(uid, peer id)``, for ``evict_for`` s.
    """

    def __init__(self, dht: DHT, layer: MoELayer, *, refresh_period: float = 15.0, evict_for: float = 30.0,
                 max_prefixes: int = 4096, lookup_timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.dht, self.layer = dht, layer
        self.refresh_period, self.evict_for, self.max_prefixes = refresh_period, evict_for, max_prefixes
        self.lookup_timeout, self.clock = lookup_timeout, clock
        self._cache: collections.OrderedDict[str, tuple[float, dict[int, tuple[str, str]]]] = collections.OrderedDict()
        self._evicted: dict[tuple[str, str], float] = {}
        self._experts: collections.OrderedDict[tuple[str, str], RemoteExpert] = collections.OrderedDict()
        self._refreshing: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def root(self) -> str:
        return f"{self.layer.uid_prefix}."

    def successors(self, prefixes: Sequence[str]) -> dict[str, dict[int, tuple[str, str]]]:
        """Each prefix's live ``{coordinate: (uid, peer id)}``, evicted servers left out."""
        with self._lock:
            missing = [p for p in prefixes if p not in self._cache]
        if missing:
            self._read(missing)
        with self._lock:
            now = self.clock()
            stale = [p for p in prefixes if now - self._cache.get(p, (now, {}))[0] >= self.refresh_period]
            for prefix in prefixes:
                if prefix in self._cache:
                    self._cache.move_to_end(prefix)
            found = {p: self._live(self._cache.get(p, (0.0, {}))[1], now) for p in prefixes}
        if stale:
            self._refresh_in_background(stale)
        return found

    def refresh(self, timeout: float = 10.0) -> dict[str, str]:
        """Read the root and up to 256 rows now (start-up, not the training loop): ``{uid: peer id}``."""
        del timeout  # every read is bounded by lookup_timeout
        self._read([self.root])
        rows = [f"{self.root}{c}." for c in self.first_coords()][:256]
        self._read(rows)
        return {uid: peer for found in self.successors(rows).values() for uid, peer in found.values()}

    def first_coords(self) -> list[int]:
        """The rows to search: those the root record names (our volunteers keep it), else every row
        (hivemind's own servers store no root record)."""
        active = self.successors([self.root])[self.root]
        return sorted(c for c in active if c < self.layer.grid[0]) or list(range(self.layer.grid[0]))

    def known(self) -> int:
        """Live uids in the cached rows (for the trainer's log line)."""
        depth = len(self.layer.grid)  # a row prefix of the last level, "L.3." on a 2-d grid, has that many dots
        with self._lock:
            now = self.clock()
            return sum(len(self._live(found, now)) for prefix, (_, found) in self._cache.items()
                       if prefix.count(".") == depth)

    def expert(self, uid: str, peer: str) -> RemoteExpert | None:
        """A ``RemoteExpert`` for ``uid`` on ``peer``, made once and kept (bounded) for its p2p client."""
        key = (uid, peer)
        if key not in self._experts:
            info = expert_info(uid, peer)
            if info is None:
                return None
            if self._experts:
                p2p = next(iter(self._experts.values())).p2p
                self._experts[key] = RemoteExpert(info, p2p)
            else:
                self._experts[key] = create_remote_experts([info], self.dht)[0]
            while len(self._experts) > self.max_prefixes:
                self._experts.popitem(last=False)
        return self._experts[key]

    def evict(self, expert: RemoteExpert, seconds: float | None = None) -> None:
        with self._lock:
            self._evicted[expert.uid, str(expert.peer_id)] = self.clock() + (seconds or self.evict_for)

    def _live(self, found: dict[int, tuple[str, str]], now: float) -> dict[int, tuple[str, str]]:
        return {c: e for c, e in found.items() if self._evicted.get(e, -math.inf) <= now}

    def _read(self, prefixes: Sequence[str]) -> None:
        try:
            found = active_successors(self.dht, prefixes, timeout=self.lookup_timeout)
        except Exception as e:  # a failed lookup must not stop training: what is cached serves
            logger.warning("prefix lookup for %s failed: %s", self.layer.uid_prefix, _describe(e))
            return
        with self._lock:
            now = self.clock()
            for prefix, successors in found.items():
                self._cache[prefix] = (now, successors)
                self._cache.move_to_end(prefix)
            while len(self._cache) > self.max_prefixes:
                self._cache.popitem(last=False)

    def _refresh_in_background(self, prefixes: list[str]) -> None:
        with self._lock:
            if self._refreshing is not None and self._refreshing.is_alive():
                return
            self._refreshing = threading.Thread(target=self._read, args=(prefixes,), daemon=True,
                                                name=f"refresh {self.layer.uid_prefix}")
            self._refreshing.start()


class GridRemoteMoE(BatchedRemoteMoE):
    """``BatchedRemoteMoE`` over a large grid: one gate per grid dimension (an expert's score is the sum
    of its coordinates' scores, as in hivemind's ``RemoteMixtureOfExperts``), and a beam search over the
    grid's prefix records that looks up only the rows the batch's tokens reach.

    Per forward: level by level, each token keeps its ``beam_size`` best live prefixes; the union of
    those over the batch is looked up (``LiveGrid``: cached, at most 256 keys a DHT call); at the last
    level each token takes its top-k live uids. The calls, failures and weights then work exactly as in
    ``BatchedRemoteMoE`` (one batched RPC per chosen expert).
    """

    def __init__(self, d_model: int, layer: MoELayer, dht: DHT, k_best: int, forward_timeout: float = 10.0,
                 backward_timeout: float = 10.0, *, max_batch_size: int = 4096, refresh_period: float = 15.0,
                 evict_for: float = 30.0, beam_size: int | None = None, max_prefixes: int = 4096):
        nn.Module.__init__(self)
        self.layer, self.k_best, self.max_batch_size = layer, k_best, max_batch_size
        self.forward_timeout, self.backward_timeout = forward_timeout, backward_timeout
        # by direction (FORWARD, BACKWARD): the configured timeouts are ceilings, the calls seen set the bound
        self.timeouts = (CallTimeouts(forward_timeout), CallTimeouts(backward_timeout))
        self.beam_size = beam_size or max(4, 2 * k_best)
        self.live = LiveGrid(dht, layer, refresh_period=refresh_period, evict_for=evict_for, max_prefixes=max_prefixes)
        self.gate = nn.ModuleList(nn.Linear(d_model, size) for size in layer.grid)
        self.calls_ok = self.calls_failed = self.last_live_count = 0
        self.answered: dict[str, list[int]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores = [gate(flat) for gate in self.gate]  # [N, grid[d]] each
        candidates = self.beam_search([s.detach() for s in scores]) if len(flat) else None
        self.last_live_count = self.live.known()
        if candidates is None:
            return torch.zeros_like(x)
        coords, uids, chosen = candidates  # [M, dims], M (uid, peer), [N, k] indices into M
        called = self.call_chosen(flat, chosen, uids)
        if called is None:
            return torch.zeros_like(x)
        outputs, answered = called
        chosen_logits = sum(scores[d].gather(1, coords[chosen, d]) for d in range(len(scores)))
        weights = renormalized_weights(chosen_logits, answered)
        return (weights.unsqueeze(-1) * outputs).sum(dim=1).reshape(x.shape)

    def call_chosen(self, flat: torch.Tensor, chosen: torch.Tensor, uids: list[tuple[str, str]]
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(outputs [N, k, d], answered [N, k])`` of the chosen experts' calls (``uids[i]``: the uid and
        server of candidate i), or None if one cannot be reached at all."""
        experts = {i: self.live.expert(*uids[i]) for i in chosen.unique().tolist()}
        if any(e is None for e in experts.values()):
            return None
        calls = plan_calls(chosen, experts, self.max_batch_size)
        return _BatchedRemoteCall.apply(flat, calls, chosen.shape[1], self)

    def beam_search(self, scores: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[str, str]], torch.Tensor] | None:
        """Each token's top-k live experts: ``(coords int64 [M, dims], (uid, peer) of each of the M,
        chosen int64 [N, k])``, or None if no expert is live."""
        n, root = scores[0].shape[0], self.live.root
        parents: list[tuple[int, ...]] = [()]
        parent_scores = torch.zeros(n, 1)
        for level in range(len(scores)):
            prefixes = [root + "".join(f"{c}." for c in p) for p in parents]
            found = self.live.successors(prefixes) if level else {root: dict.fromkeys(self.live.first_coords())}
            children, owner, leaves = [], [], []
            for index, (parent, prefix) in enumerate(zip(parents, prefixes)):
                for coord, entry in sorted(found[prefix].items()):
                    if coord < self.layer.grid[level]:
                        children.append(parent + (coord,))
                        owner.append(index)
                        leaves.append(entry)
            if not children:
                return None
            child_coord = torch.tensor([c[level] for c in children])
            child_scores = parent_scores[:, owner] + scores[level][:, child_coord]  # -inf off a token's beam
            if level == len(scores) - 1:
                k = min(self.k_best, len(children))
                return torch.tensor(children), leaves, child_scores.topk(k, dim=-1).indices
            beam = child_scores.topk(min(self.beam_size, len(children)), dim=-1)
            kept = beam.indices.unique()  # the union of the tokens' beams: the rows looked up next
            parents = [children[i] for i in kept.tolist()]
            masked = torch.full_like(child_scores, -math.inf).scatter(1, beam.indices, beam.values)
            parent_scores = masked[:, kept]
        return None
