"""The coordinator's trainer: a byte-level language model whose feed-forward layers are swarm experts.

Only the cheap parts of the model are local (embeddings, token mixers, gates, output head) and trained
here with Adam. Every MoE layer of the manifest is a ``BatchedRemoteMoE``; the experts behind it are
trained by their own servers when our backward pass calls them. A layer with no live expert acts as
the identity (it is residual), so training goes on while volunteers come and go. Every ``log_every``
steps it publishes its loss and, per volunteer, the samples that volunteer's experts answered
(signed with ``key_path``'s key: the seed's leaderboard counts only a trainer it trusts).

Latency: a step calls every MoE layer's experts once forward and once backward, one after the other,
so a step takes at least ``2 x layers`` round trips however fast the swarm computes. A step therefore
trains ``in_flight`` micro-batches at once (``Pipeline``), each a full batch, each in a thread of its
own on its own replica of the local layers (hivemind's calls release the GIL while they wait), and
applies their averaged gradient in one update: ``in_flight`` times the tokens for about the same round
trips.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from hivemind import DHT
from torch import nn

from coordinator_seeds import corpus
from coordinator_seeds.audit import AuditSettings
from coordinator_seeds.dispatch import BatchedRemoteMoE, remote_moe, shutdown_dht
from coordinator_seeds.strangers import TrustedSwarm
from volunteer.core.manifest import Manifest
from volunteer.core.records import (
    join_dht,
    publish_caller,
    publish_contributions,
    publish_trainer_progress,
    use_record_key,
    visible_maddrs,
    withdraw_caller,
)
from volunteer.core.wire import compression

logger = logging.getLogger("coordinator_seeds.trainer")

GRAD_CLIP = 1.0  # one bad batch must not wreck the local weights; experts clip (or not) on their own


@dataclass(frozen=True)
class TrainerSettings:
    manifest: Manifest
    initial_peers: tuple[str, ...]
    steps: int | None = None  # None = run until cancelled
    log_every: int = 10
    forward_timeout: float = 10.0  # ceilings: each layer waits what its recent calls took (coordinator_seeds/timeouts.py)
    backward_timeout: float = 10.0
    # micro-batches a step trains at once (each a full batch, its forward and backward in a thread of its
    # own, their gradients averaged into one update): what keeps a trainer busy across WAN round trips
    in_flight: int = 4
    seed: int = 0
    publish_progress: bool = True  # the loss for dashboards, and what each volunteer answered for the leaderboard
    key_path: Path | None = None  # the key that signs our records; a seed counts only those of the key it trusts
    expert_wait: float = 60.0  # seconds to wait at start for every layer to have an expert
    # with no expert alive at a log step, wait this long for volunteers before stepping on: only the
    # local layers would train, and a loss printed at hundreds of steps/s would say nothing
    idle_wait: float = 30.0
    host: str = "127.0.0.1"  # where its p2p daemon listens; a public address lets NATed volunteers dial in
    caller_period: float = 20.0  # seconds between refreshes of its ``callers`` record (peer id, addresses)
    # the project's trainer reads only signed server records (issue 14); False: hivemind's unsigned
    # records, one server per uid, no audits (a swarm of plain hivemind servers)
    signed_only: bool = True
    audit: AuditSettings | None = field(default_factory=AuditSettings)  # None: no audits
    # ban lists are taken from these keys (fingerprints or subkeys); our own key is always trusted
    trusted_ban_keys: tuple = ()


@dataclass(frozen=True)
class StepReport:
    step: int
    loss: float
    skipped: bool  # non-finite loss or gradient: no update was made
    seconds: float
    experts_alive: int  # over all layers, after this step's failures
    started: float = 0.0  # time.perf_counter() when its first micro-batch began
    together: int = 1  # of its micro-batches, how many were in flight at once (began before the first ended)


# --- the model -----------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """A small local token mixer: multi-head attention over earlier positions only."""

    def __init__(self, d_model: int):
        super().__init__()
        self.heads = math.gcd(d_model, 4)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, seq, d = h.shape
        q, k, v = self.qkv(h).view(batch, seq, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(mixed.transpose(1, 2).reshape(batch, seq, d))


class _Block(nn.Module):
    """Pre-norm residual block: local attention, then the swarm's MoE as the feed-forward part."""

    def __init__(self, d_model: int, moe: BatchedRemoteMoE):
        super().__init__()
        self.mix_norm, self.mixer = nn.LayerNorm(d_model), CausalSelfAttention(d_model)
        self.moe_norm, self.moe = nn.LayerNorm(d_model), moe

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mixer(self.mix_norm(h))
        return h + self.moe(self.moe_norm(h))


class MoELanguageModel(nn.Module):
    """``int64 [batch, seq] -> logits [batch, seq, 256]``, one block per MoE layer of the manifest."""

    def __init__(self, manifest: Manifest, dht: DHT, *, forward_timeout: float = 10.0,
                 backward_timeout: float = 10.0, make_moe: Callable[..., BatchedRemoteMoE] | None = None):
        super().__init__()
        d, spec = manifest.d_model, manifest.trainer
        self.embed = nn.Embedding(corpus.VOCAB_SIZE, d)
        self.positions = nn.Parameter(torch.randn(spec.seq_len, d) * 0.02)
        make_moe = make_moe or _plain_moe  # TrustedSwarm.make_moe: signed servers, replicas, audits
        self.moes = [
            make_moe(d, layer, dht, spec.k_best, forward_timeout, backward_timeout, manifest.max_batch_size)
            for layer in manifest.layers
        ]
        for moe in self.moes:  # what the volunteers' schemas declare, from the same manifest
            moe.wire = compression(manifest.wire_dtype)
        self.blocks = nn.ModuleList(_Block(d, moe) for moe in self.moes)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, corpus.VOCAB_SIZE)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.positions[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def experts_alive(self) -> int:
        return sum(moe.last_live_count for moe in self.moes)

    def answered(self) -> dict[str, tuple[int, int]]:
        """Per volunteer peer id, the samples its experts answered over every layer."""
        totals: dict[str, tuple[int, int]] = {}
        for moe in self.moes:
            # a copy made in one C call (no thread switch inside): micro-batches in flight add peers to it
            for peer, (forward, backward) in list(moe.answered.items()):
                f, b = totals.get(peer, (0, 0))
                totals[peer] = (f + forward, b + backward)
        return totals

    def grid_size(self) -> int:
        return sum(len(moe.layer.uids()) for moe in self.moes)

    def replica(self) -> MoELanguageModel:
        """A copy with weights of its own for a micro-batch in flight, sharing with this model what
        belongs to the swarm: each remote layer's live experts, the answers counted for the leaderboard,
        the measured call times. Each micro-batch's gradient stays in its own replica, so one with a
        non-finite loss is left out of the update instead of spoiling the sum."""
        shared: dict[int, object] = {}
        for moe in self.moes:
            for name, value in vars(moe).items():
                if not name.startswith("_") and not isinstance(value, (nn.Module, torch.Tensor, int, float, str)):
                    shared[id(value)] = value
        trust = getattr(self, "trust", None)  # the audits and bans of the run are one, whichever replica calls
        shared[id(trust)] = trust
        return copy.deepcopy(self, memo=shared)

    @torch.no_grad()
    def load_weights(self, source: MoELanguageModel) -> None:
        for mine, theirs in zip(self.parameters(), source.parameters()):
            mine.copy_(theirs)


# --- micro-batches in flight ---------------------------------------------------------------------


class Pipeline:
    """``in_flight`` worker threads, each with its own replica of ``model``; ``step`` trains one step.

    A step hands every worker one micro-batch (a full batch of the manifest each): the worker copies the
    current weights into its replica and runs forward and backward there, all workers at once, so their
    round trips to the swarm overlap. Then their gradients are averaged into ``model`` and the optimizer
    steps once. Measured first (bench/README.md): applying each micro-batch's gradient as soon as it was
    ready (delayed updates, up to ``in_flight - 1`` stale) trained the lab's model to a loss of 4.0
    where one micro-batch at a time reached 2.45 in 80 steps; averaged in one update they cannot drift.
    """

    def __init__(self, model: MoELanguageModel, optimizer: torch.optim.Optimizer,
                 data: Iterator[tuple[torch.Tensor, torch.Tensor]], in_flight: int):
        self.model, self.optimizer, self._data = model, optimizer, data
        self._lock = threading.Lock()  # the data iterator
        self._results: queue.Queue[tuple[MoELanguageModel, float, float, float, int] | BaseException] = queue.Queue()
        self._tickets: list[queue.Queue[bool]] = [queue.Queue() for _ in range(in_flight)]
        self._workers = [threading.Thread(target=self._work, args=(tickets, model.replica()), daemon=True,
                                          name=f"micro-batch {i}") for i, tickets in enumerate(self._tickets)]
        for worker in self._workers:
            worker.start()

    def step(self) -> StepReport:
        """One update from ``in_flight`` micro-batches computed at once (step number 0: the caller's)."""
        for tickets in self._tickets:
            tickets.put(True)
        results = [self._results.get() for _ in self._tickets]  # each bounded by its calls' timeouts
        for result in results:
            if isinstance(result, BaseException):
                raise result
        finished = [r for r in results if math.isfinite(r[1])]
        skipped = not finished
        if finished:
            self.optimizer.zero_grad(set_to_none=True)
            for replica, *_ in finished:
                for mine, theirs in zip(self.model.parameters(), replica.parameters()):
                    if theirs.grad is not None:
                        share = theirs.grad / len(finished)
                        mine.grad = share if mine.grad is None else mine.grad.add_(share)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
            skipped = not torch.isfinite(norm)
            if not skipped:
                self.optimizer.step()
        losses = [r[1] for r in finished] or [math.nan]
        started, ended = min(r[2] for r in results), max(r[3] for r in results)
        together = sum(r[2] < min(e[3] for e in results) for r in results)  # began before the first one ended
        return StepReport(0, sum(losses) / len(losses), skipped, ended - started, min(r[4] for r in results),
                          started, together)

    def close(self, timeout: float = 10.0) -> None:
        for tickets in self._tickets:
            tickets.put(False)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(deadline - time.monotonic(), 0.1))

    def _work(self, tickets: queue.Queue[bool], replica: MoELanguageModel) -> None:
        while tickets.get():
            try:
                self._results.put(self._micro_batch(replica))
            except BaseException as e:  # handed to the training loop, which stops on it
                self._results.put(e)

    def _micro_batch(self, replica: MoELanguageModel) -> tuple[MoELanguageModel, float, float, float, int]:
        """Forward and backward of one batch on ``replica``: (replica, loss, started, ended, experts alive);
        the gradient stays in the replica's parameters until ``step`` collects it."""
        with self._lock:
            inputs, targets = next(self._data)
        replica.load_weights(self.model)  # the trainer's weights do not move while micro-batches run
        started = time.perf_counter()
        replica.zero_grad(set_to_none=True)
        logits = replica(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        value = loss.detach().item()
        if math.isfinite(value):
            loss.backward()
        return replica, value, started, time.perf_counter(), replica.experts_alive()


def _plain_moe(d_model: int, layer, dht: DHT, k_best: int, forward_timeout: float, backward_timeout: float,
               max_batch_size: int) -> BatchedRemoteMoE:
    """hivemind's unsigned records, one server per uid, no audits (``TrainerSettings.signed_only=False``)."""
    return remote_moe(d_model, layer, dht, k_best, forward_timeout, backward_timeout, max_batch_size=max_batch_size)


# --- training ------------------------------------------------------------------------------------


def train(
    settings: TrainerSettings,
    *,
    dht: DHT | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    stop: threading.Event | None = None,
) -> list[StepReport]:
    """Train until ``settings.steps`` steps are done or ``stop`` is set; returns one report a step."""
    own_dht = dht is None
    if settings.key_path is not None:
        use_record_key(settings.key_path)
    if dht is None:
        dht = join_dht(settings.manifest.dht_prefix, settings.initial_peers, client_mode=True, host=settings.host)
    stop = stop or threading.Event()
    done = threading.Event()
    # volunteers behind a NAT cannot be dialled: they dial us (see volunteer.node.reachability), so
    # they must know where we are before our first call to them
    announcer = threading.Thread(target=keep_caller_record, args=(dht, settings, done), daemon=True,
                                 name="caller-record")
    announcer.start()
    try:
        return _train(settings, dht, on_step, stop)
    finally:
        done.set()
        announcer.join(timeout=10)
        if own_dht:
            shutdown_dht(dht)


def keep_caller_record(dht: DHT, settings: TrainerSettings, done: threading.Event) -> None:
    """Publish our peer id and listening addresses every ``caller_period`` s until ``done``."""
    peer_id = dht.peer_id.to_base58()
    while not done.is_set():
        try:
            maddrs = [m for m in visible_maddrs(dht) if "/p2p-circuit" not in m]
            if not publish_caller(dht, settings.manifest.dht_prefix, peer_id, maddrs):
                logger.debug("publishing our caller record was refused by the DHT")
        except Exception as e:  # the DHT may be shutting down; training must not stop for this
            logger.debug("publishing our caller record failed: %s", e)
        done.wait(settings.caller_period)
    try:  # volunteers stop dialling us now, instead of when the record expires (and saying they cannot)
        withdraw_caller(dht, settings.manifest.dht_prefix, peer_id)
    except Exception as e:
        logger.debug("withdrawing our caller record failed: %s", e)


def _train(settings: TrainerSettings, dht: DHT, on_step: Callable[[StepReport], None] | None,
           stop: threading.Event) -> list[StepReport]:
    manifest = settings.manifest
    trust = (TrustedSwarm(manifest, dht, settings.audit, settings.trusted_ban_keys) if settings.signed_only
             else None)
    try:
        return _train_model(settings, dht, on_step, stop, trust)
    finally:
        if trust is not None:
            trust.shutdown()


def _train_model(settings: TrainerSettings, dht: DHT, on_step: Callable[[StepReport], None] | None,
                 stop: threading.Event, trust: TrustedSwarm | None) -> list[StepReport]:
    manifest = settings.manifest
    with torch.random.fork_rng(devices=[]):  # reproducible weights without touching the caller's RNG
        torch.manual_seed(settings.seed)
        model = MoELanguageModel(manifest, dht, forward_timeout=settings.forward_timeout,
                                 backward_timeout=settings.backward_timeout,
                                 make_moe=trust.make_moe if trust is not None else None)
    model.trust = trust
    wait_for_experts(model, settings.expert_wait, stop)
    optimizer = torch.optim.Adam(model.parameters(), lr=manifest.trainer.lr)
    train_data, _held_out = corpus.split(corpus.load_stdlib())
    data = corpus.batches(train_data, manifest.trainer.batch_size, manifest.trainer.seq_len,
                          torch.Generator().manual_seed(settings.seed))
    reports: list[StepReport] = []
    run = secrets.token_hex(8)  # this run's contributions; the seed adds up runs
    window_start = time.perf_counter()
    step = 0
    pipeline = Pipeline(model, optimizer, data, max(1, settings.in_flight))
    publisher = Publisher()
    try:
        while not stop.is_set() and (settings.steps is None or step < settings.steps):
            step += 1
            report = replace(pipeline.step(), step=step)
            reports.append(report)
            if on_step is not None:
                on_step(report)
            if step % settings.log_every == 0:
                _log(settings, dht, model, reports[-settings.log_every:], time.perf_counter() - window_start, run,
                     publisher)
                more = settings.steps is None or step < settings.steps  # after the last step nothing to wait for
                if report.experts_alive == 0 and settings.idle_wait > 0 and more and not stop.is_set():
                    logger.warning("no expert is alive: only the trainer's local layers would train; waiting up "
                                   "to %.0f s for volunteers", settings.idle_wait)
                    wait_for_experts(model, settings.idle_wait, stop)
                window_start = time.perf_counter()
    finally:
        pipeline.close()
        publisher.close()
    if trust is not None:
        trust.finish()  # the audits still in flight decide what the last record credits
    if settings.publish_progress and (step % settings.log_every or trust is not None):
        _publish_answered(settings, dht, model, run)  # the steps since the last log count too
    return reports


def untrusted_key_warning(coordinator: str, key_path: Path) -> str | None:
    """One line if the seed at ``coordinator`` would ignore what this trainer signs with ``key_path``
    (its volunteers' work would never reach the leaderboard), else None; None too if it cannot tell."""
    from volunteer.core.records import key_fingerprint, owner_subkey_of, record_key
    from volunteer.core.seed_client import CoordinatorError, fetch_trusted_trainer_keys

    try:
        trusted = fetch_trusted_trainer_keys(coordinator)
    except CoordinatorError as e:
        logger.debug("cannot check the seed's trusted keys: %s", e)
        return None
    mine = key_fingerprint(owner_subkey_of(record_key(key_path)))
    if mine in trusted:
        return None
    return (f"the seed at {coordinator} will not credit this trainer's volunteers: it trusts trainer key "
            f"{', '.join(trusted) or '(none)'}, this trainer signs with {mine} ({key_path}); pass --key with "
            f"the seed's trainer-key.der")


def wait_for_experts(model: MoELanguageModel, timeout: float, stop: threading.Event) -> None:
    """Poll until every layer has a live expert, at most ``timeout`` seconds; layers still empty then
    act as the identity until experts appear (they are looked up again in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        lookup_timeout = min(10.0, max(deadline - time.monotonic(), 1.0))
        empty = [moe.layer.uid_prefix for moe in model.moes if not moe.live.refresh(lookup_timeout)]
        if not empty or time.monotonic() >= deadline or stop.wait(1.0):
            break
    if empty:
        logger.warning("no experts found for %s after %.0f s; training with those layers as identity",
                       ", ".join(empty), timeout)


class Publisher:
    """Runs the DHT writes of log steps in order, in a thread of its own: 40-100 ms from the DHT's peers a
    store takes a few round trips, and the training loop would start no step meanwhile."""

    def __init__(self):
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="publisher")
        self._thread.start()

    def put(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def close(self, timeout: float = 60.0) -> None:
        """Finish what was put (each DHT write is bounded), then stop."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception as e:  # the DHT may be shutting down or unreachable: training goes on
                logger.debug("publishing to the DHT failed: %s", e)


def _log(settings: TrainerSettings, dht: DHT, model: MoELanguageModel, window: list[StepReport],
         seconds: float, run: str, publisher: Publisher) -> None:
    losses = [r.loss for r in window if not r.skipped]
    loss = sum(losses) / len(losses) if losses else math.nan
    last = window[-1]
    rate = len(window) / max(seconds, 1e-9)
    tokens = settings.manifest.trainer.batch_size * settings.manifest.trainer.seq_len * max(1, settings.in_flight)
    logger.info("step %d loss %.2f, experts alive %d of %d, %.2f steps/s, %.0f tokens/s", last.step, loss,
                last.experts_alive, model.grid_size(), rate, rate * tokens)
    auditor = getattr(getattr(model, "trust", None), "auditor", None)
    if auditor is not None and auditor.audited:  # what the audits found, and what reveals cost on this link
        logger.info("%s", auditor.summary())
    if settings.publish_progress and losses:
        publisher.put(partial(_publish_progress, settings, dht, last.step, loss))
    if settings.publish_progress:
        publisher.put(partial(_publish_answered, settings, dht, model, run))


def _publish_progress(settings: TrainerSettings, dht: DHT, step: int, loss: float) -> None:
    if not publish_trainer_progress(dht, settings.manifest.dht_prefix, step, loss):
        logger.debug("publishing progress at step %d was refused by the DHT", step)


def _publish_answered(settings: TrainerSettings, dht: DHT, model: MoELanguageModel, run: str) -> None:
    answered = model.answered()
    trust = getattr(model, "trust", None)
    if trust is not None:  # only servers whose audits passed earn credit; the verdicts go out too
        answered = trust.credited(answered)
        if not trust.publish(run):
            logger.debug("publishing the audits' verdicts was refused by the DHT")
    if answered and not publish_contributions(dht, settings.manifest.dht_prefix, run, answered):
        logger.debug("publishing what the volunteers answered was refused by the DHT")
