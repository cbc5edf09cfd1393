"""The trainer's half of audits: after an answer is back, pick a few calls at random, ask their server to
reveal the committed version, recompute, and ban a server whose answer does not hold up.

A call is audited with probability ``rate`` (``AuditSettings``), drawn after the answer arrived, so a
server cannot tell which of its answers will be checked. The checks run on one worker thread, off the
training step and at the lowest CPU priority (``background_priority``; ``volunteer.core.audit_check``
says what they compare). A failed check or a version no
longer kept is a failed audit: the key and the peer are banned for this trainer at once (``banned``), the
peer's credit for the run is voided (the trainer publishes contributions only of ``credited`` peers), and
the verdict goes into a signed ``<prefix>_audits`` record that the seed reads. A reveal that does not
come in time, or whose connection failed, voids the run's credit and excludes the peer for a time that
doubles with each unanswered reveal in a row (``UNANSWERED_EXCLUSION``), unpublished: a home uplink that
went down looks the same.

A reveal's time follows its size and the link (``reveal_seconds``): the server streams the reveal's
structure first, which says how many bytes follow; the reveal then has ``reveal_floor`` seconds plus
``reveal_slack`` times what those bytes take at the throughput measured to that peer (its last reveals,
else the audited call's own bytes over its round trip, which counts the server's compute too and so errs
long), never more than ``reveal_ceiling``. Receiving is bounded: no message, and no reveal, beyond what
the structure announced or ``MAX_REVEAL_BYTES`` (``read_bounded``).

Odds: a server that answers a share ``w`` of its calls wrongly is caught at each call with probability
``rate * w``; within ``n`` calls with ``1 - (1 - rate * w) ** n`` (``calls_to_catch``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming

from volunteer.core.audit_check import (
    MAX_HEADER_BYTES,
    MAX_REVEAL_BYTES,
    REVEAL_RPC,
    AuditFailed,
    Commitment,
    ExpertSpec,
    Reveal,
    RevealRequest,
    Tolerance,
    check_backward,
    check_forward,
    decode_reveal,
    rows_digest,
)

logger = logging.getLogger("coordinator_seeds.audit")
WITHHELD = "unanswered"  # a verdict starting so: no reveal came (the connection failed, or it timed out)
# An unanswered reveal cannot be told from a network fault (a home uplink down, a saturated link), so it
# is not a published ban: the peer earns no credit in this run and gets no calls for a while, twice as
# long at each unanswered reveal in a row (30 s, 60 s, 120 s...), until one is answered.
UNANSWERED_EXCLUSION = 30.0
AUDIT_NICE = 19  # the recomputing thread's niceness: the lowest priority


@dataclass(frozen=True)
class AuditSettings:
    rate: float = 0.02  # share of calls audited, forward and backward alike
    reveal_floor: float = 15.0  # seconds for a reveal's structure to come, and the least any reveal gets
    reveal_slack: float = 4.0  # times the seconds its bytes take at the peer's measured throughput
    reveal_ceiling: float = 300.0
    assumed_rate: float = 2**17  # bytes/s to a peer nothing was measured of (a 1 Mbit/s home uplink)
    tolerance: Tolerance = field(default_factory=Tolerance)
    max_pending: int = 64  # audits waiting for the worker beyond this are skipped (never a verdict)
    seed: int | None = None  # the draw's seed, for tests; None draws from the OS


def reveal_seconds(nbytes: int, rate: float, settings: AuditSettings) -> float:
    """How long a reveal of ``nbytes`` may take over a link measured at ``rate`` bytes/s."""
    seconds = settings.reveal_floor + settings.reveal_slack * nbytes / max(rate, 1.0)
    return min(settings.reveal_ceiling, seconds)


def background_priority() -> None:
    """Lower the calling thread's CPU priority (``AUDIT_NICE``): the recomputation is never urgent (a
    verdict a few steps late bans as well), so it takes the cores only when the training step and any
    server on the same machine leave them idle. Linux only, where a thread has a priority of its own;
    torch's intra-op threads keep theirs (an expert's check is small; the step's ops use them too)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), AUDIT_NICE)


def calls_to_catch(rate: float, wrong_share: float, confidence: float = 0.95) -> int:
    """Calls after which a server wrong on ``wrong_share`` of its calls is caught with ``confidence``."""
    p = rate * wrong_share
    if p <= 0:
        return math.inf
    if p >= 1:
        return 1
    return math.ceil(math.log(1 - confidence) / math.log(1 - p))


@dataclass(frozen=True)
class AuditedCall:
    """What a trainer keeps of a sampled call to check it: no reference to the model's graph."""

    uid: str
    peer_id: str
    key: str  # the server record's key fingerprint
    expert: object  # the RemoteExpert it went to (its P2P reaches the server)
    kind: str  # "forward" or "backward"
    inputs: torch.Tensor
    answer: torch.Tensor
    commits: tuple[Commitment, ...]  # forward: (version,); backward: (before, after)
    grads: torch.Tensor | None = None
    link_rate: float | None = None  # bytes/s the call moved over its round trip (None: not measured)


class Auditor:
    """Samples calls, checks them in the background, keeps the verdicts per peer and the bans."""

    def __init__(self, specs: dict[str, ExpertSpec], settings: AuditSettings = AuditSettings(),
                 reveal: Callable[[AuditedCall, Callable[[int], float]], Reveal | None] | None = None):
        self.specs, self.settings = specs, settings
        self._reveal = reveal or reveal_over_p2p
        self._random = random.Random(settings.seed) if settings.seed is not None else random.SystemRandom()
        # Two stages: a reveal is asked for as soon as the call is drawn (several at once: a server keeps
        # only its last versions, and with micro-batches in flight they move several times a step, so a
        # reveal queued behind other audits' recomputations asked for versions already dropped: honest
        # servers failed), then the recomputation runs on one thread, off the training step.
        self._fetchers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="audit-reveal")
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit",
                                                           initializer=background_priority)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self.audited: dict[str, list[int]] = {}  # peer -> [audited, passed]
        self.failed_keys: set[str] = set()
        self.failed_peers: set[str] = set()
        self.withheld: dict[str, tuple[int, float]] = {}  # peer -> (unanswered reveals in a row, excluded until)
        self.clock = time.monotonic
        self.failures: list[str] = []  # one line per failed audit, for logs and tests
        self.skipped = 0
        self.link_rates: dict[str, float] = {}  # peer -> bytes/s its reveals came at (smoothed)
        self.reveals: list[tuple[str, int, float]] = []  # (kind, bytes, seconds) of the last reveals, for logs

    # --- sampling: called from the training step ---

    def sample(self, call: Callable[[], AuditedCall]) -> bool:
        """Draw; if this call is audited, build it (``call``) and check it in the background."""
        if self._random.random() >= self.settings.rate:
            return False
        with self._lock:
            if self._pending >= self.settings.max_pending:
                self.skipped += 1
                return False
            self._pending += 1
        self._fetchers.submit(self._fetch, call())
        return True

    def banned(self) -> frozenset[str]:
        """Keys and peers this trainer routes to no more: failed audits, and servers gone mid-audit."""
        with self._lock:
            now = self.clock()
            excluded = {peer for peer, (_, until) in self.withheld.items() if until > now}
            return frozenset(self.failed_keys | self.failed_peers | excluded)

    def credited(self, peer_id: str) -> bool:
        """Whether a peer's answers may be credited by this trainer: at least one audit passed, none failed."""
        with self._lock:
            audited, passed = self.audited.get(peer_id, (0, 0))
            return peer_id not in self.failed_peers and peer_id not in self.withheld and passed > 0 and passed == audited

    def failed(self) -> tuple[frozenset[str], frozenset[str]]:
        """The keys and the peers that failed an audit."""
        with self._lock:
            return frozenset(self.failed_keys), frozenset(self.failed_peers)

    def verdicts(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return {peer: (a, p) for peer, (a, p) in self.audited.items()}

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every submitted audit is checked (tests, the end of a run)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def shutdown(self) -> None:
        self._fetchers.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- revealing, then checking on the worker thread ---

    def _fetch(self, call: AuditedCall) -> None:
        try:
            revealed = self._revealed(call)
        except Exception as e:  # a bug of ours is not the server's failure: say so, no verdict
            logger.exception("asking %s of %s for a reveal failed on our side: %s", call.uid, call.peer_id, e)
            revealed = "error"
        try:
            self._pool.submit(self._check, call, revealed)
        except RuntimeError:  # shut down: the run is over
            self._settle(call, "error")

    def _revealed(self, call: AuditedCall) -> Reveal | str | None:
        """The server's reveal (None: it kept no such version), or a verdict if it gave none."""
        if call.uid not in self.specs:
            return "error"  # not an expert of ours: no verdict either way
        version = call.commits[-1].version
        rate = self.link_rates.get(call.peer_id) or call.link_rate or self.settings.assumed_rate
        allowed = [self.settings.reveal_floor]

        def seconds_for(nbytes: int) -> float:
            allowed[0] = reveal_seconds(nbytes, rate, self.settings)
            return allowed[0]

        started = time.perf_counter()
        try:
            reveal = self._reveal(call, seconds_for)
        except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError):
            return f"{WITHHELD}: no reveal of version {version} within {allowed[0]:.0f} s"
        except (P2PDaemonError, P2PHandlerError, ConnectionError, EOFError, asyncio.IncompleteReadError) as e:
            return f"{WITHHELD}: the reveal of version {version} failed: {type(e).__name__}: {str(e)[:120]}"
        except Exception as e:
            return f"the reveal of version {version} failed: {type(e).__name__}: {str(e)[:120]}"
        if reveal is not None:
            self._measured(call, reveal.wire_bytes or reveal_bytes(reveal), time.perf_counter() - started)
        return reveal

    def _measured(self, call: AuditedCall, nbytes: int, seconds: float) -> None:
        peer = call.peer_id
        with self._lock:
            self.reveals.append((call.kind, nbytes, seconds))
            del self.reveals[:-256]
            if nbytes >= 2**16:  # a small reveal's time is its latency, not the link's throughput
                rate = nbytes / max(seconds, 1e-3)
                old = self.link_rates.get(peer)
                self.link_rates[peer] = rate if old is None else 0.7 * old + 0.3 * rate
        logger.debug("a reveal of %d bytes from %s came in %.2f s", nbytes, peer, seconds)

    def summary(self) -> str:
        """One line for the trainer's log: audits so far and the reveals' sizes and times."""
        with self._lock:
            audited = sum(a for a, _ in self.audited.values())
            passed = sum(p for _, p in self.audited.values())
            unanswered = sum(1 for f in self.failures if WITHHELD in f)
            reveals = list(self.reveals)
        line = (f"audits: {passed} passed of {audited}, {len(self.failed_keys)} keys failed, "
                f"{unanswered} unanswered")
        for kind in ("forward", "backward"):
            sizes = sorted(b for k, b, _ in reveals if k == kind)
            times = sorted(t for k, _, t in reveals if k == kind)
            if sizes:
                line += (f"; {kind} reveals: {len(sizes)}, median {sizes[len(sizes) // 2] / 1e6:.2f} MB "
                         f"in {times[len(times) // 2]:.2f} s, slowest {times[-1]:.2f} s")
        return line

    def _check(self, call: AuditedCall, revealed: Reveal | str | None) -> None:
        try:
            verdict = revealed if isinstance(revealed, str) else self._verdict(call, revealed)
        except Exception as e:  # a bug of ours is not the server's failure: say so, no verdict
            logger.exception("auditing %s of %s failed on our side: %s", call.uid, call.peer_id, e)
            verdict = "error"
        self._settle(call, verdict)

    def _settle(self, call: AuditedCall, verdict: str | None) -> None:
        with self._lock:
            self._pending -= 1
            self._idle.notify_all()
            if verdict == "error":
                return
            counts = self.audited.setdefault(call.peer_id, [0, 0])
            counts[0] += 1
            if verdict is None:
                counts[1] += 1
                if call.peer_id in self.withheld:  # answered again: the next unanswered one starts at 30 s
                    self.withheld[call.peer_id] = (0, self.withheld[call.peer_id][1])
                return
            if verdict.startswith(WITHHELD):
                strikes, until = self.withheld.get(call.peer_id, (0, 0.0))
                if until > self.clock():  # asked before the exclusion began (one outage fails them all): no
                    self.failures.append(f"{call.kind} of {call.uid} by {call.peer_id}: {verdict}")  # new strike
                    return
                strikes += 1
                seconds = UNANSWERED_EXCLUSION * 2 ** (strikes - 1)
                self.withheld[call.peer_id] = (strikes, self.clock() + seconds)
                self.failures.append(f"{call.kind} of {call.uid} by {call.peer_id}: {verdict}")
                logger.warning("audit unanswered: %s; no calls to it for %.0f s, no credit in this run",
                               self.failures[-1], seconds)
                return
            self.failed_keys.add(call.key)
            self.failed_peers.add(call.peer_id)
            self.failures.append(f"{call.kind} of {call.uid} by {call.peer_id} (key {call.key}): {verdict}")
        logger.warning("audit failed: %s; key %s banned, its credit voided", self.failures[-1], call.key)

    def _verdict(self, call: AuditedCall, reveal: Reveal | None) -> str | None:
        """None if the call holds up, else why not."""
        spec = self.specs[call.uid]
        if reveal is None:
            return f"version {call.commits[-1].version} was not kept"
        try:
            if call.kind == "forward":
                check_forward(spec, call.commits[0], reveal, call.inputs, call.answer, self.settings.tolerance)
            else:
                check_backward(spec, call.commits[0], call.commits[1], reveal, call.inputs, call.grads, call.answer,
                               self.settings.tolerance)
        except AuditFailed as e:
            return str(e)
        return None


def reveal_bytes(reveal: Reveal) -> int:
    """The tensor bytes a reveal carried."""
    tensors = [*reveal.module.values(), reveal.inputs, reveal.grads]
    if reveal.optimizer is not None:
        tensors += [v for entries in reveal.optimizer["state"].values() for v in entries.values()]
    size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return size + (reveal_bytes(reveal.parent) if reveal.parent is not None else 0)


REVEAL_TRIES = 3  # a cut reveal is asked for again: servers before core.streams were cut 1-3 in 1,000


class StreamCut(ConnectionError):
    """The reveal's stream ended before what its server had announced: a network fault, never a verdict."""


def reveal_over_p2p(call: AuditedCall, seconds_for: Callable[[int], float]) -> Reveal | None:
    """Ask the call's server for what the audit needs of the version its answer committed to (``REVEAL_RPC``,
    a stream): the structure within ``seconds_for(0)``, the rest within ``seconds_for(its bytes)``. A stream
    cut short is asked for again, up to ``REVEAL_TRIES`` times: only the server's own empty structure says
    that the version is not kept, so a cut can neither ban an honest server nor pass a lying one."""
    expert = call.expert
    own = (call.inputs, call.grads) if call.kind == "backward" and call.grads is not None else None
    asked = RevealRequest(call.commits[-1].version, call.kind, len(call.inputs) if own else 0,
                          rows_digest(*own) if own else b"")
    request = runtime_pb2.ExpertRequest(uid=call.uid, metadata=asked.to_bytes())
    given_up = seconds_for(0) + seconds_for(MAX_REVEAL_BYTES) + 5.0  # the structure and the largest reveal

    async def ask() -> tuple[bytes, list[runtime_pb2.Tensor]] | None:
        _, reader, writer = await expert.p2p.call_binary_stream_handler(expert.peer_id, REVEAL_RPC)
        try:
            await P2P.send_protobuf(request, writer)
            await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
            first = await asyncio.wait_for(read_bounded(reader, MAX_HEADER_BYTES), seconds_for(0))
            if first is None:
                raise StreamCut("the reveal's stream ended before its structure")
            if not first.metadata:
                return None
            announced = _announced(first.metadata)
            budget = [announced + 2**16]  # the tensors' bytes and their parts' framing
            parts: list[runtime_pb2.Tensor] = []
            received = 0

            async def rest() -> None:  # up to the announced bytes, then this side closes first (streams.py)
                nonlocal received
                while received < announced and (message := await read_bounded(reader, budget[0])) is not None:
                    budget[0] -= message.ByteSize() + 1 + P2P.HEADER_LEN
                    parts.extend(message.tensors)
                    received += sum(len(part.buffer) for part in message.tensors)

            await asyncio.wait_for(rest(), seconds_for(announced))
            if received < announced:
                raise StreamCut(f"the reveal's stream ended after {received} of its {announced} bytes")
            return first.metadata, _combined(parts)
        except asyncio.IncompleteReadError as e:  # inside a message
            raise StreamCut(f"the reveal's stream ended inside a message: {e}") from None
        finally:
            writer.close()

    for attempt in range(1, REVEAL_TRIES + 1):
        future = RemoteExpertWorker.run_coroutine(ask(), return_future=True)
        try:
            received = future.result(timeout=given_up)
            break
        except StreamCut as e:
            if attempt == REVEAL_TRIES:
                raise
            logger.info("reveal of %s v%d from %s: %s; asking again", call.uid, asked.version, call.peer_id, e)
        finally:
            future.cancel()  # a reveal given up on must not go on reading
    if received is None:
        return None
    return decode_reveal(*received, own=own)


async def read_bounded(reader: asyncio.StreamReader, limit: int) -> runtime_pb2.ExpertResponse | None:
    """The next message of a protobuf stream in hivemind's framing (``P2P.receive_protobuf``), refusing
    one longer than ``limit`` before reading it: hivemind's own reader takes any length a peer announces.
    None at the end of the stream; a handler's error raises ``P2PHandlerError``."""
    try:
        marker = await reader.readexactly(1)
        length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    except asyncio.IncompleteReadError:
        return None
    if length > max(limit, 0):
        raise ValueError(f"a reveal's message of {length} bytes is over what was announced")
    data = await reader.readexactly(length)
    if marker == P2P.ERROR_MARKER:
        raise P2PHandlerError(f"the reveal failed on the server: {RPCError.FromString(data).message[:200]}")
    if marker != P2P.MESSAGE_MARKER:
        raise ValueError("a reveal's message is not in hivemind's framing")
    return runtime_pb2.ExpertResponse.FromString(data)


def _announced(header: bytes) -> int:
    """The tensor bytes a reveal's structure announces, within ``MAX_REVEAL_BYTES``."""
    try:
        announced = MSGPackSerializer.loads(header).get("bytes")
    except Exception:
        announced = None
    if type(announced) is not int or not 0 <= announced <= MAX_REVEAL_BYTES:
        raise ValueError(f"a reveal announced {announced!r} bytes (at most {MAX_REVEAL_BYTES})")
    return announced


def _combined(parts: list[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
    """The parts of streamed tensors put back together (a part with a dtype starts the next tensor)."""
    tensors, current = [], []
    for part in parts:
        if part.dtype and current:
            tensors.append(combine_from_streaming(current))
            current = []
        current.append(part)
    if current:
        tensors.append(combine_from_streaming(current))
    return tensors
