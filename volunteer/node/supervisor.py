"""The running volunteer: a trio supervisor around a started ``VolunteerNode``.

``run_volunteer`` takes the state dir's lock, starts the node on the main thread, then runs
``supervise``: pollers that sample the stats, read the machine and the swarm, save lifetime totals
and checkpoints and re-announce; the control socket; the dashboard or the headless JSON lines. A
signal, ``volunteer stop`` or ``q`` starts the drain (state ``draining``): pollers stop, the node
withdraws, checkpoints and leaves, the views stay up until it is done. A second signal exits at once.
A rebalance, or a node whose hivemind machinery died (``_watch_node``), drains the same way and then
starts a node again; the owner's limits pause and resume it (``limits.Pauser``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable

import trio

from volunteer.config.settings import Settings
from volunteer.core.logs import EventLog, divert_logs_for_dashboard
from volunteer.core.paths import Paths
from volunteer.core.procgroup import (
    InstanceLock,
    become_supervisor,
    exit_now,
    isolate_workers,
)
from volunteer.core.seed_client import CoordinatorError, fetch_verified
from volunteer.host.telemetry import TelemetryReader
from volunteer.node import swarm
from volunteer.node.control import ControlServer, socket_path
from volunteer.node.limits import Pauser, limits_of
from volunteer.node.node import NodeInfo, VolunteerNode, load_experiment
from volunteer.node.reachability import ReachWatch
from volunteer.planning.rebalance import Rebalance

logger = logging.getLogger(__name__)
SAMPLE_PERIOD = 1.0
TELEMETRY_PERIOD = 2.0
SWARM_PERIOD = 10.0
VERIFIED_PERIOD = 30.0  # the coordinator's leaderboard line: every volunteer asks, so not too often
LIFETIME_SAVE_PERIOD = 5.0  # what a kill -9 can lose of the lifetime totals
REACH_PERIOD = 5.0  # how soon a NATed volunteer dials a trainer that has just published its address
WATCH_PERIOD = 2.0  # how often the node's hivemind threads and processes are checked
RESTART_DELAYS = (2.0, 5.0, 15.0, 30.0, 60.0)  # before each restart after a failure, within an hour
RESTART_WINDOW = 3600.0  # more failures than RESTART_DELAYS in this many seconds: exit 1 for the service manager


def run_volunteer(
    settings: Settings, paths: Paths, *, events: EventLog | None = None, dashboard: bool = False,
    on_ready: Callable[[NodeInfo], None] = lambda info: None,
) -> NodeInfo | None:
    """Run a volunteer until it is stopped. Raises on bad input before anything is served."""
    become_supervisor()
    isolate_workers()  # before any fork: hivemind's processes go in a group the terminal does not signal
    # NVML numbers GPUs by PCI bus, CUDA by speed unless told otherwise: make "cuda:N" mean the same GPU
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    control = ControlServer(socket_path(paths.runtime_dir), {})  # a too-long path fails here, before joining
    lock = InstanceLock(paths.state_dir / "volunteer.lock")
    warning = lock.acquire()
    if warning:
        logger.warning(warning)
    node, prefer, restore_logs = None, (), None
    failures = FailureBudget()
    pause_reasons: dict[str, str] | None = None
    # while no node is supervised (starting, between restarts) SIGTERM and SIGHUP still stop cleanly
    handlers = {signum: signal.signal(signum, _raise_stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    info = None
    try:
        experiment = load_experiment(settings, paths)
        startup: list[str] = []
        if dashboard:
            # hivemind's workers, forked below, keep the log handlers they are born with: give them
            # the log file now, or their warnings would tear the dashboard's screen
            log_file = paths.state_dir / "volunteer.log"
            print(f"joining the swarm of {experiment.manifest.name}; the dashboard follows (log: {log_file})",
                  flush=True)
            restore_logs = divert_logs_for_dashboard(startup.append, log_file)
        # on a restart, the control socket answers "restarting" and takes a stop (between_runs)
        between: contextlib.AbstractContextManager = contextlib.nullcontext()
        delay = 0.0
        while True:  # once; again after a rebalance with the uids it chose, or after a failure
            with between:
                time.sleep(delay)
                node = VolunteerNode(settings, paths, experiment, events, prefer=prefer)
                try:
                    # Started on the main thread, not a trio worker: a child's PDEATHSIG fires when the
                    # *thread* that forked it exits, and trio retires idle worker threads after seconds.
                    info = node.start()
                except Exception as e:
                    node.shutdown()
                    if info is None:  # the first start: bad input or a broken machine, said in one line
                        raise
                    (events or node.events).emit("restart_failed", f"restart failed: {type(e).__name__}: {e}",
                                                 error=str(e))
                    delay = failures.next_delay(f"restart failed: {e}")
                    continue
            for line in startup:  # warnings of the start, for the events panel
                node.collector.note(line)
            on_ready(info)
            outcome = trio.run(supervise, node, control, dashboard, pause_reasons)  # it drains and shuts the node down
            if not outcome.failure and not outcome.uids:
                return info
            delay = failures.next_delay(outcome.failure) if outcome.failure else 0.0
            prefer, pause_reasons = outcome.uids, outcome.pause_reasons
            between = between_runs(control, node.collector.snapshot().to_dict())
    except StopRequested as e:
        logger.info(f"{e} while no node was serving: stopped")
        return info
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if node is not None:
            node.shutdown()
        if restore_logs is not None:
            restore_logs()
        lock.release()


def between_runs(control: ControlServer, last: dict[str, Any]) -> contextlib.AbstractContextManager:
    """The control socket while a restart waits and starts its node: ``status`` gives the last figures
    as state "restarting", ``stop`` stops the client as SIGTERM does (the main thread's handler)."""

    async def status(request: dict[str, Any]) -> dict[str, Any]:
        return dict(status={**last, "state": "restarting", "time": time.time()})

    async def stop(request: dict[str, Any]) -> dict[str, Any]:
        logger.info("stop requested over the control socket while restarting")
        os.kill(os.getpid(), signal.SIGTERM)
        return dict(pid=os.getpid())

    return ControlServer(control.path, dict(status=status, stop=stop)).in_thread()


class StopRequested(BaseException):
    """SIGTERM or SIGHUP while no node is being supervised: stop, as a drain would. A BaseException,
    as KeyboardInterrupt is, so that no ``except Exception`` (ours around a restart, or hivemind's)
    takes it for a failure."""


def _raise_stop(signum: int, frame: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


@dataclass(frozen=True)
class Outcome:
    """How a node's run ended: ``uids`` to serve next (empty: the owner stopped it), and the
    ``failure`` that ended it, if one did."""

    uids: tuple[str, ...] = ()
    failure: str | None = None
    pause_reasons: dict[str, str] | None = None  # still in force: the next node starts paused

class FailureBudget:
    """Restarts after failures, with growing delays; too many in ``RESTART_WINDOW`` and we give up."""

    def __init__(self, delays: tuple[float, ...] = RESTART_DELAYS, window: float = RESTART_WINDOW,
                 clock: Callable[[], float] = time.monotonic):
        self.delays, self.window, self.clock = delays, window, clock
        self.times: list[float] = []

    def next_delay(self, failure: str) -> float:
        """Seconds to wait before serving again; raises ``NodeFailed`` when the budget is spent."""
        now = self.clock()
        self.times = [t for t in self.times if now - t < self.window] + [now]
        if len(self.times) > len(self.delays):
            raise NodeFailed(f"{failure}; {len(self.times)} failures within {self.window / 60:.0f} min, giving up")
        delay = self.delays[len(self.times) - 1]
        logger.warning(f"{failure}; serving again in {delay:.0f} s")
        return delay


class NodeFailed(RuntimeError):
    """The node kept failing: the client exits 1 and leaves it to its service manager."""


async def supervise(node: VolunteerNode, control: ControlServer, dashboard: bool = False,
                    pause_reasons: dict[str, str] | None = None) -> Outcome:
    """Run until stopped or the node fails; drain, shut the node down, and say what comes next.

    ``pause_reasons``: those of the node before a restart; it starts paused while any holds."""
    settings, collector, events = node.settings, node.collector, node.events
    stopping = Stopping()
    pauser = Pauser(node, pause_reasons)
    if pauser.reasons:
        await trio.to_thread.run_sync(pauser.update, {})
    collector.limits = limits_of(settings)
    control.handlers.update(_control_handlers(node, stopping, pauser))
    async with trio.open_nursery() as views:
        views.start_soon(_watch_signals, stopping)
        await views.start(control.serve)
        node.report_serving()  # after the socket is up, so `volunteer status` works from this line on
        if dashboard:
            views.start_soon(_run_dashboard, node, stopping)
        async with trio.open_nursery() as work:
            if settings.stats:  # off: counters only (benchmarks measure what the rest costs)
                work.start_soon(partial(_every, SAMPLE_PERIOD, collector.sample, first=0))
                work.start_soon(partial(_every, SWARM_PERIOD, _SwarmPoller(node), first=1, abandon=True))
                if settings.coordinator:
                    work.start_soon(partial(_every, VERIFIED_PERIOD, partial(_read_verified, node), first=5))
            if settings.stats or settings.max_temp is not None or settings.pause_on_gpu_use:  # limits need it
                reader = TelemetryReader()
                work.start_soon(partial(_every, TELEMETRY_PERIOD, partial(_read_telemetry, node, reader), first=0))
            work.start_soon(partial(_every, TELEMETRY_PERIOD, pauser.check_limits, first=0.5))
            work.start_soon(_every, LIFETIME_SAVE_PERIOD, collector.persist)
            work.start_soon(_every, settings.checkpoint_interval, node.checkpoint)
            work.start_soon(partial(_every, settings.announce_interval, node.announce, abandon=True))
            work.start_soon(partial(_every, REACH_PERIOD, ReachWatch(node), first=0, abandon=True))
            if not dashboard:
                work.start_soon(_every, settings.log_interval, lambda: events.write(_stats_line(collector)))
            if settings.rebalance_period > 0:
                work.start_soon(_rebalance, node, stopping)
            work.start_soon(_watch_node, node, stopping)
            await stopping.event.wait()
            work.cancel_scope.cancel()
        await trio.to_thread.run_sync(pauser.freeze)  # no pause or resume may undo the drain from here
        started = time.monotonic()
        moves = stopping.rebalance
        if moves:
            events.emit("rebalancing", f"moving {', '.join(moves.drop)} to {', '.join(moves.take)}: "
                        "the swarm serves those least", drop=list(moves.drop), take=list(moves.take))
        events.emit("draining", "draining: withdrawn from the DHT, finishing requests, then saving and leaving")
        await trio.to_thread.run_sync(node.drain)
        await trio.to_thread.run_sync(node.shutdown)
        events.emit("stopped", f"left the swarm in {time.monotonic() - started:.1f} s",
                    lifetime=collector.snapshot().lifetime.__dict__)
        views.cancel_scope.cancel()
    if stopping.by_user:  # a stop during a rebalance's or a failure's drain is still a stop
        return Outcome()
    if stopping.failure:
        return Outcome(node.info.uids, stopping.failure, pauser.reasons)
    if moves is None:
        return Outcome()
    return Outcome(tuple([uid for uid in node.info.uids if uid not in moves.drop] + list(moves.take)),
                   pause_reasons=pauser.reasons)


async def _watch_node(node: VolunteerNode, stopping: Stopping) -> None:
    """A node whose hivemind server, runtime or DHT died serves nothing while it looks alive: restart it."""
    while True:
        await trio.sleep(WATCH_PERIOD)
        failure = node.failure()
        if failure:
            node.events.emit("node_failed", f"{failure}: saving and restarting", reason=failure)
            stopping.for_failure(failure)
            return


async def _rebalance(node: VolunteerNode, stopping: Stopping) -> None:
    """Every ``rebalance_period`` on average (randomised, so volunteers do not all move at once), ask
    whether moving experts would serve the swarm's weakest uids better; if so, drain and restart."""
    rng = random.Random()
    while True:
        await trio.sleep(node.settings.rebalance_period * rng.uniform(0.5, 1.5))
        if node.collector.state != "serving":
            continue
        try:
            found = await trio.to_thread.run_sync(node.rebalance, abandon_on_cancel=True)
        except Exception as e:  # a failed look at the swarm is no reason to move, or to stop
            logger.warning(f"rebalance check failed: {type(e).__name__}: {e}")
            continue
        if found:
            stopping.for_rebalance(found)
            return


def _control_handlers(node: VolunteerNode, stopping: Stopping, pauser: Pauser) -> dict[str, Any]:
    async def status(request: dict[str, Any]) -> dict[str, Any]:
        return dict(status=node.collector.snapshot().to_dict())

    async def stop(request: dict[str, Any]) -> dict[str, Any]:
        logger.info("stop requested over the control socket")
        stopping.by_user_now()
        return dict(pid=os.getpid())

    async def pause(request: dict[str, Any]) -> dict[str, Any]:
        await trio.to_thread.run_sync(pauser.set, "user", "paused by the user")
        return dict(state=node.collector.state, reasons=list(node.collector.pause_reasons))

    async def resume(request: dict[str, Any]) -> dict[str, Any]:
        await trio.to_thread.run_sync(pauser.set, "user", None)
        return dict(state=node.collector.state, reasons=list(node.collector.pause_reasons))

    return dict(status=status, stop=stop, pause=pause, resume=resume)


class Stopping:
    """Why the supervisor is leaving: the owner asked (signal, `volunteer stop`, `q`), or a rebalance
    wants a restart. A stop by the owner always wins, and only a second one exits without draining."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.by_user = False
        self.rebalance: Rebalance | None = None  # the moves to make before serving again
        self.failure: str | None = None  # what broke, when the node must be restarted

    def by_user_now(self) -> None:
        self.by_user = True
        self.event.set()

    def for_rebalance(self, moves: Rebalance) -> None:
        self.rebalance = moves
        self.event.set()

    def for_failure(self, failure: str) -> None:
        self.failure = failure
        self.event.set()


async def _watch_signals(stopping: Stopping) -> None:
    # SIGHUP: the terminal went away (ssh dropped, tmux killed); leave as cleanly as on SIGTERM
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if stopping.by_user and signum == signal.SIGHUP:
                continue  # a hangup comes more than once (from tmux, then the kernel): not a request
            if stopping.by_user:
                logger.warning(f"second {signal.Signals(signum).name}: exiting now without draining")
                exit_now(128 + signum)
            logger.info(f"received {signal.Signals(signum).name}; draining (again to exit at once)")
            stopping.by_user_now()


async def _run_dashboard(node: VolunteerNode, stopping: Stopping) -> None:
    from volunteer.views.dashboard import run_dashboard

    collector = node.collector

    async def snapshot():
        return collector.snapshot()

    restore = divert_logs_for_dashboard(collector.note, node.paths.state_dir / "volunteer.log")
    node.events.sink = collector.note
    try:
        while True:  # after `q` the screen stays up, without keys, to show the drain
            if await run_dashboard(snapshot, keys=not stopping.by_user) == "quit":
                stopping.by_user_now()
    except OSError as e:  # the terminal is gone (SIGHUP follows): serving and the drain go on without it
        logger.warning(f"the dashboard stopped: {e}")
    finally:
        node.events.sink = None
        restore()


class _SwarmPoller:
    """Reads the swarm panel's figures and reports volunteers that come and go."""

    def __init__(self, node: VolunteerNode):
        self.node = node
        self.known: set[str] | None = None

    def __call__(self) -> None:
        node = self.node
        view, others = swarm.read_swarm_view(node.dht, node.manifest.dht_prefix, node.manifest.all_uids(),
                                             node.info.uids, node.info.peer_id)
        node.collector.swarm = view
        if self.known is not None:
            for peer in sorted(self.known - others):
                node.events.emit("peer_lost", f"volunteer {peer} left the swarm", peer_id=peer)
            for peer in sorted(others - self.known):
                node.events.emit("peer_joined", f"volunteer {peer} joined the swarm", peer_id=peer)
        self.known = others


def _read_verified(node: VolunteerNode) -> None:
    try:
        verified = fetch_verified(node.settings.coordinator, node.info.peer_id)
    except CoordinatorError as e:  # no news: the last line read stays on screen
        logger.debug(str(e))
        return
    node.collector.verified = asdict(verified)


def _read_telemetry(node: VolunteerNode, reader: TelemetryReader) -> None:
    collector = node.collector
    collector.telemetry = reader.read()
    collector.plans = tuple({**plan, "measured_peak_bytes": check.measured_bytes, "plan_check": check.to_dict()}
                            for plan, check in zip(collector.plans, node.check_plans()))


def _stats_line(collector) -> dict[str, Any]:
    figures = collector.snapshot().to_dict()
    del figures["plans"], figures["events"]  # the plans are in the serving event; events are lines of their own
    return {"event": "stats", **figures}


async def _every(period: float, action: Callable[[], object], *, first: float | None = None,
                 abandon: bool = False) -> None:
    """Run ``action`` in a worker thread every ``period`` seconds, the first time after ``first``.

    ``abandon``: on cancel, stop waiting for a call in flight. For DHT reads and writes, which block
    for ever once the DHT process is dead: the drain must not wait for them."""
    await trio.sleep(period if first is None else first)
    while True:
        try:
            await trio.to_thread.run_sync(action, abandon_on_cancel=abandon)
        except Exception as e:  # one failed poll, save or announce must not stop serving
            logger.warning(f"{getattr(action, '__name__', type(action).__name__)} failed: {type(e).__name__}: {e}")
        await trio.sleep(period)
