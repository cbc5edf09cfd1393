"""Contribution stats, measured where the work happens, and the one snapshot every view renders.

hivemind runs every expert's forward and backward in the Runtime thread of the volunteer's main
process (connection handlers only relay tensors), so plain counters guarded by a lock, updated by
``serving.CountingBackend``, see every sample that is really computed. ``StatsCollector`` samples
them once a second into rate windows, adds the lifetime totals kept in the state dir, and builds
the ``StatsSnapshot`` that the dashboard, the headless JSON lines and ``volunteer status`` share.

Nothing else writes into the collector: the pollers (``node.pollers``) return what they read and the
supervisor folds it in (``StatsCollector.fold``); the node's state and pause reasons are the node's,
given to ``snapshot``. A snapshot crosses the control socket as JSON: ``to_dict`` writes it, pydantic
``TypeAdapter``s read it back over the same frozen dataclasses (``Totals`` keeps its strict check).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Iterable

from pydantic import BeforeValidator, TypeAdapter, ValidationError

from volunteer.core.files import DurableJSON
from volunteer.core.seed_client import Verified
from volunteer.host.telemetry import Telemetry
from volunteer.node.limits import Limits
from volunteer.planning.choice import Plan
from volunteer.planning.memory import PLAN_CHECK_JSON, PlanCheck
from volunteer.serving.counters import ExpertCounters, ExpertStats

logger = logging.getLogger(__name__)

# hivemind's backward recomputes the forward pass, then runs it backward (about twice its cost)
RATE_WINDOWS = (10.0, 300.0)
HISTORY_BUCKET = 10.0  # seconds per bar of the throughput history
HISTORY_SECONDS = 600.0
MAX_TOTAL = 1e300  # a total beyond this (or NaN, or inf) is a corrupt file, not a contribution
# With no work done since the last write only the uptime moved: rewriting the file (two fsyncs) every
# few seconds for that was ~12% of an idle volunteer's samples; a kill -9 then loses at most this much
# uptime, and nothing of the work
IDLE_SAVE_PERIOD = 60.0


class NodeState(StrEnum):
    """Where a volunteer node is in its life; only ``VolunteerNode`` changes it. A ``StrEnum``, so the
    JSON (status answers, stats lines) keeps the plain strings it always had."""

    JOINING = "joining"
    SERVING = "serving"
    PAUSED = "paused"
    DRAINING = "draining"
    RESTARTING = "restarting"  # between two nodes: the supervisor's control socket answers with it


@dataclass(frozen=True)
class Totals:
    """What a volunteer contributed, over a session or its whole life."""

    forward_samples: int = 0
    backward_samples: int = 0
    optimizer_steps: int = 0
    busy_seconds: float = 0.0
    flops: float = 0.0
    uptime_seconds: float = 0.0

    def __add__(self, other: Totals) -> Totals:
        return Totals(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @classmethod
    def of(cls, experts: Iterable[ExpertStats], uptime: float) -> Totals:
        experts = list(experts)
        return cls(
            forward_samples=sum(e.forward_samples for e in experts),
            backward_samples=sum(e.backward_samples for e in experts),
            optimizer_steps=sum(e.backward_batches for e in experts),  # this session's updates only
            busy_seconds=sum(e.busy_seconds for e in experts),
            flops=sum(e.flops for e in experts),
            uptime_seconds=uptime,
        )

    @classmethod
    def from_dict(cls, data: Any) -> Totals:
        """Strict: a state file or a status answer with anything but non-negative numbers is rejected."""
        if not isinstance(data, dict):
            raise ValueError("totals must be an object")
        values = {}
        for f in fields(cls):
            value = data.get(f.name, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_TOTAL:
                raise ValueError(f"totals.{f.name} must be a non-negative number, not {value!r}")
            values[f.name] = int(value) if f.type == "int" else float(value)
        return cls(**values)


# a snapshot's totals are read by the hand-written check: pydantic's lax int takes 5.0 but refuses 5.5,
# its strict one refuses 5.0; the files and answers we accept today need exactly ``Totals.from_dict``
StrictTotals = Annotated[Totals, BeforeValidator(lambda data: data if isinstance(data, Totals) else Totals.from_dict(data))]


class LifetimeStore:
    """Lifetime totals in ``<state_dir>/lifetime.json``, rewritten atomically every few seconds.

    A kill -9 loses at most what happened since the last write; a corrupt file is moved aside and
    counting starts again from the backup written before it."""

    def __init__(self, path: Path):
        self.file = DurableJSON(path, "lifetime stats")
        self.path, self.backup = self.file.path, self.file.backup

    def load(self) -> Totals:
        return self.file.load(Totals.from_dict) or Totals()

    def save(self, totals: Totals) -> None:
        self.file.save(asdict(totals))


@dataclass(frozen=True)
class ExpertView:
    """One row of the experts table: counters plus measured rates (samples/s over the short window)."""

    stats: ExpertStats
    forward_rate: float = 0.0
    backward_rate: float = 0.0


@dataclass(frozen=True)
class SwarmView:
    dht_peers: int = 0
    volunteers: int = 0
    grid_size: int = 0
    covered: int = 0  # uids with at least one server
    replicas: dict[str, int] = field(default_factory=dict)  # my uid -> servers of it, me included
    trainer_step: int | None = None
    trainer_loss: float | None = None
    trainer_seen: float | None = None  # unix time of the trainer's last report


@dataclass(frozen=True)
class PlanView:
    """One serving device's memory plan and, once the telemetry poller has measured that device, its
    check (``memory.PlanCheck``). In JSON one flat object, as it always was: the plan's fields, plus
    ``measured_peak_bytes`` and ``plan_check`` once checked."""

    plan: Plan
    check: PlanCheck | None = None

    @property
    def measured_peak_bytes(self) -> int | None:
        return None if self.check is None else self.check.measured_bytes

    def to_dict(self) -> dict[str, Any]:
        data = self.plan.to_dict()
        if self.check is not None:
            data.update(measured_peak_bytes=self.check.measured_bytes, plan_check=self.check.to_dict())
        return data

    @classmethod
    def from_dict(cls, data: Any) -> PlanView:
        """What ``to_dict`` wrote; pydantic's errors for anything else."""
        if isinstance(data, PlanView):
            return data
        if not isinstance(data, dict):
            raise ValueError("a plan must be an object")
        plan = Plan.from_dict({k: v for k, v in data.items() if k not in ("measured_peak_bytes", "plan_check")})
        check = data.get("plan_check")
        return cls(plan, None if check is None else PLAN_CHECK_JSON.validate_python(check))


# a snapshot's plans cross the control socket flat (``PlanView.to_dict``), not as nested dataclasses
FlatPlanView = Annotated[PlanView, BeforeValidator(PlanView.from_dict)]


@dataclass(frozen=True)
class Readings:
    """What the pollers read last; ``StatsCollector.fold`` replaces it whole, so a snapshot never
    sees half of one poll."""

    telemetry: Telemetry | None = None
    swarm: SwarmView | None = None
    plans: tuple[PlanView, ...] = ()  # one memory plan per serving device
    verified: Verified | None = None
    reach: dict[str, Any] | None = None  # reachability.ReachView.to_dict


@dataclass(frozen=True)
class StatsSnapshot:
    time: float
    experiment: str
    peer_id: str
    state: NodeState
    device: str
    started: float
    experts: tuple[ExpertView, ...] = ()
    session: StrictTotals = Totals()
    lifetime: StrictTotals = Totals()
    rates: dict[str, float] = field(default_factory=dict)  # "10s"/"300s" -> samples/s, fwd+bwd
    history: tuple[float, ...] = ()  # samples/s per HISTORY_BUCKET, oldest first
    telemetry: Telemetry | None = None
    swarm: SwarmView | None = None
    plans: tuple[FlatPlanView, ...] = ()  # one memory plan per serving device
    verified: Verified | None = None  # its coordinator leaderboard line
    events: tuple[str, ...] = ()  # the latest notable events, oldest first, "HH:MM:SS message"
    pause_reasons: tuple[str, ...] = ()  # why the volunteer is paused ("paused by the user", "outside 22-08")
    limits: Limits | None = None  # what the owner allowed: power, threads, memory...
    reach: dict[str, Any] | None = None  # how trainers reach us, with advice (reachability.ReachView.to_dict)

    @property
    def uptime(self) -> float:
        return max(0.0, self.time - self.started)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["plans"] = tuple(plan.to_dict() for plan in self.plans)
        data["uptime"] = self.uptime
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StatsSnapshot:
        """Rebuild what ``to_dict`` made (``volunteer monitor`` renders a remote client's snapshot).
        ``uptime`` is derived, so it is left out. Raises ``SnapshotError`` in one line."""
        try:
            return _SNAPSHOT.validate_python({k: v for k, v in data.items() if k != "uptime"})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise SnapshotError(f"{where}: {first['msg']}"[:300]) from None


class SnapshotError(TypeError, ValueError):
    """A snapshot in a form this version cannot read: a TypeError for the CLI's "another version"
    message, a ValueError as every rejected input is."""


_SNAPSHOT = TypeAdapter(StatsSnapshot)


class RateMeter:
    """Cumulative counts sampled about once a second; rates are differences over a time window."""

    def __init__(self, horizon: float = HISTORY_SECONDS):
        self.horizon = horizon
        self.samples: deque[tuple[float, dict[str, int]]] = deque()

    def add(self, now: float, counts: dict[str, int]) -> None:
        self.samples.append((now, counts))
        while self.samples and now - self.samples[0][0] > self.horizon + 1:
            self.samples.popleft()

    def rate(self, key: str, window: float) -> float:
        if len(self.samples) < 2:
            return 0.0
        now, latest = self.samples[-1]
        then, earlier = next(((t, c) for t, c in self.samples if now - t <= window + 0.5), self.samples[0])
        return (latest.get(key, 0) - earlier.get(key, 0)) / (now - then) if now > then else 0.0

    def history(self, key: str, bucket: float = HISTORY_BUCKET) -> tuple[float, ...]:
        """Rate per ``bucket`` seconds, from the oldest full bucket to now."""
        if len(self.samples) < 2:
            return ()
        now = self.samples[-1][0]
        edges = [now - bucket * i for i in range(int(self.horizon // bucket), -1, -1)]
        values, previous = [], None
        for edge in edges:
            point = next(((t, c.get(key, 0)) for t, c in reversed(self.samples) if t <= edge + 0.5), None)
            if point is not None and previous is not None and point[0] > previous[0]:
                values.append((point[1] - previous[1]) / (point[0] - previous[0]))
            previous = point if point is not None else previous
        return tuple(values)


class StatsCollector:
    """The counters' rates and totals, plus what the pollers read last; views read snapshots."""

    def __init__(self, experiment: str, peer_id: str, device: str, counters: Iterable[ExpertCounters],
                 lifetime: LifetimeStore, plans: Iterable[PlanView] = (), limits: Limits | None = None):
        self.experiment, self.peer_id, self.device = experiment, peer_id, device
        self.counters = list(counters)
        self.store = lifetime
        self.lifetime_base = lifetime.load()
        self.started = time.time()
        self.limits = limits
        self.meter = RateMeter()
        self.readings = Readings(plans=tuple(plans))
        self.events: deque[str] = deque(maxlen=8)
        self._saved = self.lifetime_base
        self._written = False  # the first persist always writes: the file exists from then on

    def fold(self, **readings: Any) -> None:
        """Keep what a poller returned (``Readings``' field names); the one way readings get in."""
        self.readings = replace(self.readings, **readings)

    def sample(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        counts: dict[str, int] = {"samples": 0}
        for stats in (c.snapshot() for c in self.counters):
            counts[f"{stats.uid}/forward"] = stats.forward_samples
            counts[f"{stats.uid}/backward"] = stats.backward_samples
            counts["samples"] += stats.forward_samples + stats.backward_samples
        self.meter.add(now, counts)

    def session(self, now: float | None = None) -> Totals:
        now = time.time() if now is None else now
        return Totals.of((c.snapshot() for c in self.counters), now - self.started)

    def snapshot(self, state: NodeState = NodeState.JOINING, pause_reasons: tuple[str, ...] = ()) -> StatsSnapshot:
        """Everything the views show; ``state`` and ``pause_reasons`` are the node's (``VolunteerNode.snapshot``)."""
        now = time.time()
        window = RATE_WINDOWS[0]
        experts = tuple(
            ExpertView(s, self.meter.rate(f"{s.uid}/forward", window), self.meter.rate(f"{s.uid}/backward", window))
            for s in (c.snapshot() for c in self.counters)
        )
        session = Totals.of((e.stats for e in experts), now - self.started)
        readings = self.readings
        return StatsSnapshot(
            time=now, experiment=self.experiment, peer_id=self.peer_id, state=state, device=self.device,
            started=self.started, experts=experts, session=session, lifetime=self.lifetime_base + session,
            rates={f"{w:.0f}s": self.meter.rate("samples", w) for w in RATE_WINDOWS},
            history=self.meter.history("samples"), telemetry=readings.telemetry, swarm=readings.swarm,
            plans=readings.plans, verified=readings.verified, events=tuple(self.events),
            pause_reasons=pause_reasons, limits=self.limits, reach=readings.reach,
        )

    def note(self, message: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {message}")

    def persist(self, *, final: bool = False) -> Totals:
        """Write lifetime totals; never lets them go backwards, whatever the clock did. While idle (no
        work since the last write) only every ``IDLE_SAVE_PERIOD`` of uptime, unless ``final``."""
        lifetime = self.lifetime_base + self.session()
        lifetime = Totals(**{f.name: max(getattr(lifetime, f.name), getattr(self._saved, f.name))
                             for f in fields(Totals)})
        idle = all(getattr(lifetime, f.name) == getattr(self._saved, f.name)
                   for f in fields(Totals) if f.name != "uptime_seconds")
        if (idle and not final and self._written
                and lifetime.uptime_seconds - self._saved.uptime_seconds < IDLE_SAVE_PERIOD):
            return lifetime
        self.store.save(lifetime)
        self._written = True
        self._saved = lifetime
        return lifetime
