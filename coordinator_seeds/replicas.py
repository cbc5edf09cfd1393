"""Every signed server of a uid serves: the trainer's lookup and routing over replicas, with audits.

``SignedServers`` replaces hivemind's ``get_experts`` for the project's trainer: it reads only the
signed server records (``volunteer.core.expert_records``), so a peer that re-declares someone else's
uid in hivemind's unsigned records gets no call; it drops banned keys (the seed's list and this
trainer's own failed audits) and servers evicted after a failure.

``ReplicatedRemoteMoE`` is a ``BatchedRemoteMoE`` whose chosen experts may each have several servers:
the tokens of a uid are split over its servers in proportion to their rate (``split_tokens``; the
rate is the one a server's record declares until the trainer has measured it, then the lower of the
two, so a server cannot buy traffic by declaring more than it serves). Direct servers come first: when
a uid has a live server whose record says ``reachable`` (dialable, issue 12), its tokens go to those only;
servers reached over their own outbound connections or a relay get tokens when no direct one is alive,
and are tried last in failover. A call that fails is sent again, within the same step, to the uid's other
servers (``FAILOVER_ROUNDS``). Answers carry
commitments (``volunteer.core.audit_check``); an ``Auditor`` samples some after they are back.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

import torch
from hivemind import DHT
from hivemind.compression import deserialize_tensor_stream, deserialize_torch_tensor
from hivemind.moe.client.expert import (
    RemoteExpert,
    create_remote_experts,
)
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.control import (
    DEFAULT_MAX_MSG_SIZE,
    MAX_UNARY_PAYLOAD_SIZE,
)
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import iter_as_aiter
from hivemind.utils.streaming import split_for_streaming
from torch.autograd.function import once_differentiable

from coordinator_seeds.audit import AuditedCall, Auditor
from coordinator_seeds.dispatch import (
    BACKWARD,
    COUNTS_LOCK,
    FLAT_GATE_MAX_UIDS,
    FORWARD,
    BatchedRemoteMoE,
    GridRemoteMoE,
    LiveGrid,
    call_experts,
    renormalized_weights,
)
from volunteer.core.audit_check import (
    AUDITED_BACKWARD,
    AUDITED_BACKWARD_STREAM,
    AUDITED_FORWARD,
    AUDITED_FORWARD_STREAM,
    BACKWARD_COMMIT,
    FORWARD_COMMIT,
    Commitment,
)
from volunteer.core.expert_records import (
    AUDIT_PROTOCOL,
    ServerRecord,
    read_groups,
    read_servers,
    row_group_keys,
)
from volunteer.core.manifest import MoELayer
from volunteer.core.wire import Sent, as_received, serialize

logger = logging.getLogger("coordinator_seeds.replicas")
FAILOVER_ROUNDS = 2  # a failed call is retried on up to this many other servers of its uid, same step
RATE_MEMORY = 0.3  # weight of the newest measurement in a server's measured rate


@dataclass(eq=False)
class Replica:
    """One server of one uid, as the trainer routes to it."""

    record: ServerRecord
    expert: RemoteExpert
    measured: float | None = None  # samples/s over round trips, smoothed

    @property
    def peer_id(self) -> str:
        return self.record.peer_id

    @property
    def rate(self) -> float:
        declared = max(self.record.samples_per_second, 1.0)
        return declared if self.measured is None else max(min(declared, self.measured), 1.0)

    def observe(self, samples: int, seconds: float) -> None:
        rate = samples / max(seconds, 1e-6)
        self.measured = rate if self.measured is None else (1 - RATE_MEMORY) * self.measured + RATE_MEMORY * rate


def split_tokens(n: int, rates: Sequence[float]) -> list[int]:
    """``n`` tokens split in proportion to ``rates`` (largest remainders); sums to ``n``."""
    total = sum(rates)
    if not rates or n <= 0:
        return [0] * len(rates)
    exact = [n * r / total for r in rates] if total > 0 else [n / len(rates)] * len(rates)
    counts = [int(e) for e in exact]
    for i in sorted(range(len(rates)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    return counts


def preferred(replicas: Sequence[Replica]) -> list[Replica]:
    """The servers of a uid that share its tokens: the direct ones if any is alive, else all of them. An
    indirect path holds only while the volunteer's connection to this trainer does, and a relay cuts large
    calls, so it costs failed calls (and a step's failover) that a dialable server does not."""
    direct = [r for r in replicas if r.record.reachable]
    return direct or list(replicas)


def next_replica(replicas: Sequence[Replica], tried: Collection[Replica]) -> Replica | None:
    """The server to send a failed call to: one of a peer not yet tried, direct before indirect, then the
    fastest."""
    peers = {t.peer_id for t in tried}
    left = [r for r in replicas if r not in tried and r.peer_id not in peers]
    return max(left, key=lambda r: (r.record.reachable, r.rate), default=None)


class SignedServers:
    """The servers of one layer's uids that signed records name, minus banned and evicted ones.

    Like ``dispatch.LiveExperts``: ``current()`` never waits once a first list exists; a stale list
    starts a background lookup. Eviction after a failure is per (uid, peer)."""

    def __init__(self, dht: DHT, dht_prefix: str, uids: Sequence[str], *,
                 banned: Callable[[], Collection[str]] = frozenset, refresh_period: float = 15.0,
                 evict_for: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.dht, self.dht_prefix, self.uids = dht, dht_prefix, list(uids)
        self.banned, self.refresh_period, self.evict_for, self.clock = banned, refresh_period, evict_for, clock
        self._found: dict[int, list[Replica]] = {}
        self._known: dict[tuple[str, str], Replica] = {}  # (uid, peer) -> replica, so measurements carry over
        self._evicted: dict[tuple[str, str], float] = {}
        self._pending: concurrent.futures.Future | None = None
        self._started_at = -math.inf
        self._lock = threading.Lock()

    def current(self) -> dict[int, list[Replica]]:
        with self._lock:
            if self._started_at == -math.inf:
                self._start_lookup()
                self._collect(wait=10.0)
            self._collect(wait=0.0)
            if self.clock() - self._started_at >= self.refresh_period and self._pending is None:
                self._start_lookup()
            return self._alive()

    def refresh(self, timeout: float = 10.0) -> dict[int, list[Replica]]:
        with self._lock:
            if self._pending is None:
                self._start_lookup()
            self._collect(wait=timeout)
            return self._alive()

    def evict(self, replica: Replica, seconds: float | None = None) -> None:
        with self._lock:
            self._evicted[replica.record.uid, replica.peer_id] = self.clock() + (seconds or self.evict_for)

    def replicas(self, uid: str) -> list[Replica]:
        """The live servers of ``uid`` (for failover within a step)."""
        with self._lock:
            index = self.uids.index(uid) if uid in self.uids else -1
            return self._alive().get(index, [])

    def _start_lookup(self) -> None:
        future: concurrent.futures.Future = concurrent.futures.Future()
        banned = frozenset(self.banned())

        def lookup() -> None:
            try:
                records = read_servers(self.dht, self.dht_prefix, self.uids, banned=banned, audit=AUDIT_PROTOCOL)
                infos = [ExpertInfo(r.uid, PeerID.from_base58(r.peer_id)) for rs in records.values() for r in rs]
                experts = create_remote_experts(infos, self.dht) if infos else []
                future.set_result(list(zip([r for rs in records.values() for r in rs], experts)))
            except BaseException as e:
                future.set_exception(e)

        threading.Thread(target=lookup, name=f"signed lookup {self.uids[0]}", daemon=True).start()
        self._pending, self._started_at = future, self.clock()

    def _collect(self, wait: float) -> None:
        if self._pending is None:
            return
        try:
            found = self._pending.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            return
        except Exception as e:  # keep the old list, retry later
            logger.warning("signed lookup for %s failed: %s", self.uids[0].split(".", 1)[0], e)
        else:
            index = {uid: i for i, uid in enumerate(self.uids)}
            known, grid = {}, {}
            for record, expert in found:
                replica = self._known.get((record.uid, record.peer_id))
                if replica is None or replica.record != record:
                    replica = Replica(record, expert, replica.measured if replica else None)
                known[record.uid, record.peer_id] = replica
                grid.setdefault(index[record.uid], []).append(replica)
            self._known, self._found = known, grid
        self._pending = None

    def _alive(self) -> dict[int, list[Replica]]:
        now = self.clock()
        self._evicted = {key: until for key, until in self._evicted.items() if until > now}
        banned = frozenset(self.banned())
        alive = {}
        for i, replicas in self._found.items():
            ok = [r for r in replicas if (r.record.uid, r.peer_id) not in self._evicted
                  and r.peer_id not in banned and r.record.key not in banned]
            if ok:
                alive[i] = ok
        return alive


@dataclass(frozen=True)
class ReplicaCall:
    """The tokens of one uid sent to one of its servers."""

    replica: Replica
    tokens: torch.Tensor  # int64 [n]
    slots: torch.Tensor  # int64 [n]

    @property
    def expert(self) -> RemoteExpert:
        return self.replica.expert


def plan_replica_calls(chosen: torch.Tensor, servers: dict[int, list[Replica]], max_batch_size: int
                       ) -> list[ReplicaCall]:
    """Group tokens by chosen uid, split each group over the uid's preferred servers by rate, then by
    batch limit."""
    calls = []
    for index in chosen.unique().tolist():
        tokens, slots = (chosen == index).nonzero(as_tuple=True)
        replicas = preferred(servers[index])
        start = 0
        for replica, count in zip(replicas, split_tokens(len(tokens), [r.rate for r in replicas])):
            for part_start in range(start, start + count, max_batch_size):
                part = slice(part_start, min(part_start + max_batch_size, start + count))
                calls.append(ReplicaCall(replica, tokens[part], slots[part]))
            start += count
    return calls


def committed_answer(result: Any, shape: torch.Size, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(tensor, commitment row)`` of an audited server's answer, or None if it failed or is malformed:
    the wrong shape, non-finite values, or commitment rows that are not one version for the whole call."""
    if isinstance(result, BaseException) or len(result) != 2:
        return None
    tensor, commits = result
    if tensor.shape != shape or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        return None
    if commits.dtype != torch.int64 or commits.shape != (shape[0], width) or not (commits == commits[:1]).all():
        return None
    return tensor, commits[0]


def audited_rpc(name: str):
    """An RPC for ``dispatch.call_experts``: hivemind's request to the server's audited handler, whose
    answer carries the commitment; streamed above hivemind's unary payload size, as hivemind's own
    client does (``expert_forward``), so a call of any batch size goes through."""
    stream_name = {AUDITED_FORWARD: AUDITED_FORWARD_STREAM, AUDITED_BACKWARD: AUDITED_BACKWARD_STREAM}[name]

    async def rpc(uid: str, _tensors: Any, serialized: Sequence[runtime_pb2.Tensor], stub: Any
                  ) -> list[torch.Tensor]:
        if sum(len(t.buffer) for t in serialized) <= MAX_UNARY_PAYLOAD_SIZE:  # what goes out, compressed
            request = runtime_pb2.ExpertRequest(uid=uid, tensors=serialized)
            response = await stub._p2p.call_protobuf_handler(stub._peer, name, request, runtime_pb2.ExpertResponse)
            return [deserialize_torch_tensor(t) for t in response.tensors]
        parts = (part for tensor in serialized for part in split_for_streaming(tensor, DEFAULT_MAX_MSG_SIZE))
        requests = iter_as_aiter(runtime_pb2.ExpertRequest(uid=uid, tensors=[part]) for part in parts)
        responses = await stub._p2p.iterate_protobuf_handler(stub._peer, stream_name, requests,
                                                             runtime_pb2.ExpertResponse)
        return await deserialize_tensor_stream(response.tensors async for response in responses)

    return rpc


class _ReplicatedCall(torch.autograd.Function):
    """``x [N, d] -> (outputs [N, k, d], answered bool [N, k])`` over replicas, with failover."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, calls: list[ReplicaCall], k: int, layer: ReplicatedRemoteMoE) -> Any:
        inputs = x.detach().cpu()
        outputs = torch.zeros(len(inputs), k, inputs.shape[1])
        answered = torch.zeros(len(inputs), k, dtype=torch.bool)
        ok: list[tuple[ReplicaCall, Commitment]] = []
        pending, tried = list(calls), {id(c): {c.replica} for c in calls}
        for round_ in range(FAILOVER_ROUNDS + 1):
            started = time.perf_counter()
            timeouts = layer.timeouts[FORWARD]
            sent = [serialize(inputs[c.tokens], layer.wire) for c in pending]
            results = call_experts([(c.expert, [part]) for c, part in zip(pending, sent)], audited_rpc(AUDITED_FORWARD),
                                   timeouts.current(), timeouts.observe)
            seconds = time.perf_counter() - started
            retry = []
            for call, part, result in zip(pending, sent, results):
                answer = committed_answer(result, torch.Size((len(call.tokens), inputs.shape[1])), FORWARD_COMMIT)
                if layer.record_replica(call, answer is not None, result, FORWARD, seconds):
                    output, row = answer
                    outputs[call.tokens, call.slots] = output
                    answered[call.tokens, call.slots] = True
                    commit = Commitment.of_row(row)
                    ok.append((call, commit))
                    layer.audit(call, "forward", part, output, (commit,), seconds=seconds)
                elif round_ < FAILOVER_ROUNDS and (other := layer.other_replica(call, tried[id(call)])) is not None:
                    moved = ReplicaCall(other, call.tokens, call.slots)
                    tried[id(moved)] = tried[id(call)] | {other}
                    retry.append(moved)
            layer.failovers += len(retry)
            if not retry:
                break
            pending = retry
        ctx.save_for_backward(inputs)
        ctx.calls, ctx.layer = [c for c, _ in ok], layer  # backward goes to the server that answered forward
        ctx.mark_non_differentiable(answered)
        return outputs.to(x.device, x.dtype), answered.to(x.device)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_outputs: torch.Tensor, _grad_answered: Any) -> Any:
        (inputs,) = ctx.saved_tensors
        grads, calls, layer = grad_outputs.cpu().float(), ctx.calls, ctx.layer
        requests = [(c.expert, [serialize(inputs[c.tokens], layer.wire),
                                serialize(grads[c.tokens, c.slots].contiguous(), layer.wire)]) for c in calls]
        started = time.perf_counter()
        timeouts = layer.timeouts[BACKWARD]
        results = call_experts(requests, audited_rpc(AUDITED_BACKWARD), timeouts.current(), timeouts.observe)
        seconds = time.perf_counter() - started
        grad_inputs = torch.zeros_like(inputs)
        for call, (_expert, (x, g)), result in zip(calls, requests, results):
            answer = committed_answer(result, torch.Size((len(call.tokens), inputs.shape[1])), BACKWARD_COMMIT)
            if layer.record_replica(call, answer is not None, result, BACKWARD, seconds):
                grad, row = answer
                grad_inputs.index_add_(0, call.tokens, grad)
                commits = (Commitment.of_row(row[:FORWARD_COMMIT]), Commitment.of_row(row[FORWARD_COMMIT:]))
                layer.audit(call, "backward", x, grad, commits, grads=g, seconds=seconds)
        return grad_inputs.to(grad_outputs.device, grad_outputs.dtype), None, None, None


class _ReplicaRouting:
    """What the flat and the grid layers share once their experts have several servers: failover to
    another server of the uid, per-server counts and measured rates, eviction, and audit sampling.
    ``self.live`` has ``replicas(uid)`` and ``evict(replica)``."""

    auditor: Auditor | None
    failovers: int
    calls_by_peer: dict[str, int]

    def other_replica(self, call: ReplicaCall, tried: set[Replica]) -> Replica | None:
        """The next server of the call's uid not yet tried this step (``next_replica``), or None."""
        return next_replica(self.live.replicas(call.replica.record.uid), tried)

    def record_replica(self, call: ReplicaCall, ok: bool, result: Any, direction: int, seconds: float) -> bool:
        """``record_outcome`` for one server of a uid, which also counts RPCs per peer and, on an answer,
        the server's measured rate. Returns ``ok``."""
        peer = call.replica.peer_id
        with COUNTS_LOCK:  # several micro-batches in flight record their answers at once
            self.calls_by_peer[peer] = self.calls_by_peer.get(peer, 0) + 1
            if ok:
                call.replica.observe(len(call.tokens), seconds)
        return self.record_outcome(peer, len(call.tokens), ok, result, direction, evicted=call.replica,
                                   what=f"server {peer} of {call.replica.record.uid}")

    def audit(self, call: ReplicaCall, kind: str, inputs: Sent, answer: torch.Tensor,
              commits: tuple[Commitment, ...], grads: Sent | None = None, seconds: float = 0.0) -> None:
        """Offer a call to the auditor; ``inputs`` and ``grads`` as sent (a serialized tensor is decoded
        only if the call is drawn: the audit recomputes from what the server read, rounding and all)."""
        if self.auditor is None:
            return
        record = call.replica.record
        moved = sum(len(t.buffer) if isinstance(t, runtime_pb2.Tensor) else t.numel() * t.element_size()
                    for t in (inputs, answer, grads) if t is not None)
        link_rate = moved / seconds if seconds > 0 else None  # with the server's compute: errs slow
        self.auditor.sample(lambda: AuditedCall(record.uid, record.peer_id, record.key, call.expert, kind,
                                                as_received(inputs).clone(), answer.clone(), commits,
                                                None if grads is None else as_received(grads).clone(),
                                                link_rate))

    def _routing(self, auditor: Auditor | None, banned: Callable[[], Collection[str]]) -> Callable[[], frozenset]:
        self.auditor, self.failovers, self.calls_by_peer = auditor, 0, {}

        def all_banned() -> frozenset[str]:  # the seed's list and this trainer's own failed audits
            return frozenset(banned()) | (auditor.banned() if auditor is not None else frozenset())

        return all_banned


class ReplicatedRemoteMoE(_ReplicaRouting, BatchedRemoteMoE):
    """A ``BatchedRemoteMoE`` over signed servers: every server of a uid gets a share of its tokens.

    ``answered`` counts samples per server peer as the parent does; ``failovers`` counts calls sent
    again to another server within their step; ``calls_by_peer`` counts RPCs per peer."""

    def __init__(self, d_model: int, layer: MoELayer, dht: DHT, dht_prefix: str, k_best: int,
                 forward_timeout: float = 10.0, backward_timeout: float = 10.0, *, max_batch_size: int = 4096,
                 refresh_period: float = 15.0, evict_for: float = 30.0, auditor: Auditor | None = None,
                 banned: Callable[[], Collection[str]] = frozenset):
        super().__init__(d_model, layer, dht, k_best, forward_timeout, backward_timeout,
                         max_batch_size=max_batch_size, refresh_period=refresh_period, evict_for=evict_for)
        self.live = SignedServers(dht, dht_prefix, layer.uids(), banned=self._routing(auditor, banned),
                                  refresh_period=refresh_period, evict_for=evict_for)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        servers = self.live.current()
        if not servers or len(flat) == 0:
            self.last_live_count = len(servers)
            return torch.zeros_like(x)
        logits = self.gate(flat)
        chosen = self.route(logits.detach(), servers)
        calls = plan_replica_calls(chosen, servers, self.max_batch_size)
        outputs, answered = _ReplicatedCall.apply(flat, calls, chosen.shape[1], self)
        self.last_live_count = len(self.live.current())
        weights = renormalized_weights(logits.gather(1, chosen), answered)
        return (weights.unsqueeze(-1) * outputs).sum(dim=1).reshape(x.shape)


# --- large grids: the beam search of dispatch.GridRemoteMoE over signed rows -------------------------

SIGNED = "signed"  # a row entry's server field: its servers are the signed records (SignedGrid.replicas)
PROBE_ROWS = 16  # rows the root does not name, read per refresh period (SignedGrid.first_coords)


class SignedGrid(LiveGrid):
    """``dispatch.LiveGrid`` whose rows are read from the signed group keys (``row_group_keys``): a row
    prefix ``L.3.`` lists the uids with at least one signed, unbanned server, and ``replicas(uid)``
    their servers. The levels above the rows (the root ``L.``, and on grids of 3+ dimensions the inner
    prefixes) only say which rows to look at: hivemind's prefix records, as ``LiveGrid`` reads them.
    Reads stay bounded as ``LiveGrid``'s: the rows the batch's tokens reach, in calls of at most 256 keys."""

    def __init__(self, dht: DHT, layer: MoELayer, dht_prefix: str, *, banned: Callable[[], Collection[str]],
                 **kwargs: Any):
        super().__init__(dht, layer, **kwargs)
        self.dht_prefix, self.banned = dht_prefix, banned
        self._replicas: dict[str, list[Replica]] = {}  # uid -> its servers, as the rows last read said
        self._probing: threading.Thread | None = None  # a read of rows the root does not name (first_coords)
        self._probed_at, self._probe_cursor = -math.inf, 0

    def replicas(self, uid: str) -> list[Replica]:
        banned = frozenset(self.banned())
        with self._lock:
            now = self.clock()
            return [r for r in self._replicas.get(uid, ()) if r.peer_id not in banned and r.record.key not in banned
                    and self._evicted.get((uid, r.peer_id), -math.inf) <= now]

    def evict(self, replica: Replica, seconds: float | None = None) -> None:
        with self._lock:
            self._evicted[replica.record.uid, replica.peer_id] = self.clock() + (seconds or self.evict_for)

    def first_coords(self) -> list[int]:
        """The rows the root names, and those where signed servers were seen. The root record is
        hivemind's format, unsigned: a stranger can name rows nobody serves (each costs one bounded read
        of its row's signed keys, which then lists no uid) or blank a row's entry (a later expiration
        wins) to steer the beam search away from it. So it is only a hint: every refresh period the rows
        it does not name are read ``PROBE_ROWS`` at a time, in turn, in the background, and a row found
        with signed servers stays searched while it is cached; a hidden row of an R-row grid is found
        within R / ``PROBE_ROWS`` refresh periods."""
        depth = len(self.layer.grid)
        named = set(super().first_coords())
        with self._lock:
            seen = {int(row.rsplit(".", 2)[1]) for row, (_, found) in self._cache.items()
                    if row.count(".") == depth == 2 and found}
        if depth == 2:
            self._probe([c for c in range(self.layer.grid[0]) if c not in named | seen])
        return sorted(named | seen)

    def _probe(self, unnamed: list[int]) -> None:
        """Read the next ``PROBE_ROWS`` of the rows the root does not name, off the training step, at
        most once a refresh period."""
        with self._lock:
            now = self.clock()
            busy = self._probing is not None and self._probing.is_alive()
            if not unnamed or busy or now - self._probed_at < self.refresh_period:
                return
            self._probed_at = now
            start = self._probe_cursor % len(unnamed)
            window = (unnamed[start:] + unnamed[:start])[:PROBE_ROWS]
            self._probe_cursor = start + len(window)
            rows = [f"{self.root}{c}." for c in window]
            self._probing = threading.Thread(target=self._read_rows, args=(rows,), daemon=True,
                                             name=f"probe {self.layer.uid_prefix}")
            self._probing.start()

    def _live(self, found: dict[int, tuple[str, str]], now: float) -> dict[int, tuple[str, str]]:
        banned = frozenset(self.banned())
        return {c: e for c, e in found.items()
                if e[1] != SIGNED or any(r.peer_id not in banned and r.record.key not in banned
                                         and self._evicted.get((e[0], r.peer_id), -math.inf) <= now
                                         for r in self._replicas.get(e[0], ()))}

    def _read(self, prefixes: Sequence[str]) -> None:
        depth = len(self.layer.grid)
        rows = [p for p in prefixes if p.count(".") == depth]
        if len(rows) < len(prefixes):
            super()._read([p for p in prefixes if p.count(".") != depth])
        if rows:
            self._read_rows(rows)

    def _read_rows(self, rows: list[str]) -> None:
        keys = {row: row_group_keys(self.dht_prefix, row, self.layer.grid[-1]) for row in rows}
        try:
            found = read_groups(self.dht, [k for ks in keys.values() for k in ks], banned=frozenset(self.banned()),
                                timeout=self.lookup_timeout, audit=AUDIT_PROTOCOL)
        except Exception as e:  # a failed lookup must not stop training: what is cached serves
            logger.warning("signed row lookup for %s failed: %s", self.layer.uid_prefix, e)
            return
        made = {}
        for row in rows:
            for record in (r for key in keys[row] for r in found[key]):
                made.setdefault(record.uid, []).append(record)
        with self._lock:
            now = self.clock()
            for row in rows:
                entries = {}
                for uid in [u for u in made if u.startswith(row) and u.count(".") == row.count(".")]:
                    entries[int(uid.rsplit(".", 1)[1])] = (uid, SIGNED)
                    self._replicas[uid] = [self._replica(record) for record in made[uid]]
                for coord, (uid, _) in self._cache.get(row, (0.0, {}))[1].items():
                    if coord not in entries:  # a uid whose servers all left: forget them
                        self._replicas.pop(uid, None)
                self._cache[row] = (now, entries)
                self._cache.move_to_end(row)
            while len(self._cache) > self.max_prefixes:
                _, (_, dropped) = self._cache.popitem(last=False)
                for uid, _ in dropped.values():
                    self._replicas.pop(uid, None)

    def _replica(self, record: ServerRecord) -> Replica:
        """The replica of ``record``, keeping the rate measured for its server before."""
        old = next((r for r in self._replicas.get(record.uid, ()) if r.peer_id == record.peer_id), None)
        if old is not None and old.record == record:
            return old
        expert = self.expert(record.uid, record.peer_id)
        return Replica(record, expert, old.measured if old is not None else None)


class ReplicatedGridMoE(_ReplicaRouting, GridRemoteMoE):
    """``dispatch.GridRemoteMoE`` (a gate per grid dimension, beam search over the rows its tokens reach)
    over signed servers: each chosen uid's tokens are split over its servers by rate, with failover
    and audits as in ``ReplicatedRemoteMoE``."""

    def __init__(self, d_model: int, layer: MoELayer, dht: DHT, dht_prefix: str, k_best: int,
                 forward_timeout: float = 10.0, backward_timeout: float = 10.0, *, max_batch_size: int = 4096,
                 refresh_period: float = 15.0, evict_for: float = 30.0, auditor: Auditor | None = None,
                 banned: Callable[[], Collection[str]] = frozenset, **kwargs: Any):
        super().__init__(d_model, layer, dht, k_best, forward_timeout, backward_timeout,
                         max_batch_size=max_batch_size, refresh_period=refresh_period, evict_for=evict_for, **kwargs)
        self.live = SignedGrid(dht, layer, dht_prefix, banned=self._routing(auditor, banned),
                               refresh_period=refresh_period, evict_for=evict_for,
                               max_prefixes=self.live.max_prefixes)

    def call_chosen(self, flat: torch.Tensor, chosen: torch.Tensor, uids: list[tuple[str, str]]
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        servers = {i: self.live.replicas(uids[i][0]) for i in chosen.unique().tolist()}
        if not all(servers.values()):
            return None
        calls = plan_replica_calls(chosen, servers, self.max_batch_size)
        return _ReplicatedCall.apply(flat, calls, chosen.shape[1], self)


def replicated_moe(d_model: int, layer: MoELayer, dht: DHT, dht_prefix: str, k_best: int,
                   forward_timeout: float = 10.0, backward_timeout: float = 10.0, **kwargs: Any
                   ) -> ReplicatedRemoteMoE | ReplicatedGridMoE:
    """``dispatch.remote_moe`` over signed servers: the flat gate for small grids, the beam search for
    large ones (the same rule, ``FLAT_GATE_MAX_UIDS``)."""
    size = math.prod(layer.grid)
    kind = ReplicatedGridMoE if len(layer.grid) >= 2 and size > FLAT_GATE_MAX_UIDS else ReplicatedRemoteMoE
    return kind(d_model, layer, dht, dht_prefix, k_best, forward_timeout, backward_timeout, **kwargs)
