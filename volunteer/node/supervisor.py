"""The running volunteer's life cycle: start a node, supervise it, drain it, restart or stop.

``run_volunteer`` takes the state dir's lock, starts the node on the main thread, then runs
``supervise``: the pollers (``node.pollers``: the stats, the machine, the swarm), saving lifetime
totals and checkpoints, re-announcing; the control socket; the dashboard (a runner the CLI passes in,
so the running node never imports the views) or the headless JSON lines. A signal, ``volunteer stop``
or ``q`` starts the drain (state ``draining``): pollers stop, the node withdraws, checkpoints and
leaves, the views stay up until it is done. A second signal exits at once. A rebalance, or a node
whose hivemind machinery died (``_watch_node``), drains the same way and then starts a node again;
the owner's limits pause and resume it (``limits.Pauser``).

Why a trio loop per node and not one for the whole process: hivemind's DHT and p2pd children die
(PR_SET_PDEATHSIG) when the *thread* that forked them exits. Nodes are therefore started on the main
thread, which outlives them, and each ``supervise`` runs ``trio.run`` there after the start; between
two nodes the control socket is served from a short-lived thread's own loop (``between_runs``). One
loop for the process would need every start to run on a dedicated long-lived thread while trio's
worker threads come and go; that change (and the experiment proving it safe) is not made yet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable

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
from volunteer.host.telemetry import TelemetryReader
from volunteer.node.control import ControlServer, socket_path
from volunteer.node.limits import Pauser
from volunteer.node.node import NodeInfo, VolunteerNode, load_experiment
from volunteer.node.pollers import (
    SwarmPoller,
    every,
    read_telemetry,
    read_verified,
    stats_line,
)
from volunteer.node.stats import NodeState, StatsSnapshot
from volunteer.planning.rebalance import Rebalance

# views.dashboard.run_dashboard: shows snapshots until ``q`` ("quit") or cancelled; keys=False: no keys
DashboardRunner = Callable[..., Awaitable[str | None]]

logger = logging.getLogger(__name__)
SAMPLE_PERIOD = 1.0
TELEMETRY_PERIOD = 2.0
SWARM_PERIOD = 10.0
VERIFIED_PERIOD = 30.0  # the coordinator's leaderboard line: every volunteer asks, so not too often
LIFETIME_SAVE_PERIOD = 5.0  # what a kill -9 can lose of the lifetime totals
WATCH_PERIOD = 2.0  # how often the node's hivemind threads and processes are checked
RESTART_DELAYS = (2.0, 5.0, 15.0, 30.0, 60.0)  # before each restart after a failure, within an hour
RESTART_WINDOW = 3600.0  # more failures than RESTART_DELAYS in this many seconds: exit 1 for the service manager


def run_volunteer(
    settings: Settings, paths: Paths, *, events: EventLog | None = None, dashboard: DashboardRunner | None = None,
    on_ready: Callable[[NodeInfo], None] = lambda info: None,
) -> NodeInfo | None:
    """Run a volunteer until it is stopped. Raises on bad input before anything is served.

    ``dashboard``: the runner of the dashboard (``views.dashboard.run_dashboard``); None: headless."""
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
        if dashboard is not None:
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
            between = between_runs(control, node.snapshot().to_dict())
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
        return dict(status={**last, "state": NodeState.RESTARTING.value, "time": time.time()})

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


async def supervise(node: VolunteerNode, control: ControlServer, dashboard: DashboardRunner | None = None,
                    pause_reasons: dict[str, str] | None = None) -> Outcome:
    """Run until stopped or the node fails; drain, shut the node down, and say what comes next.

    ``pause_reasons``: those of the node before a restart; it starts paused while any holds."""
    settings, collector, events = node.settings, node.collector, node.events
    stopping = Stopping()
    pauser = Pauser(node, settings, events.emit, pause_reasons, serving_gpus=_serving_gpus(node))
    if pauser.reasons:
        await trio.to_thread.run_sync(pauser.update, {})
    control.handlers.update(_control_handlers(node, stopping, pauser))
    async with trio.open_nursery() as views:
        views.start_soon(_watch_signals, stopping)
        await views.start(control.serve)
        node.report_serving()  # after the socket is up, so `volunteer status` works from this line on
        if dashboard is not None:
            views.start_soon(_run_dashboard, node, stopping, dashboard)
        async with trio.open_nursery() as work:
            fold = collector.fold  # what the pollers return goes in here, and only here
            if settings.stats:  # off: counters only (benchmarks measure what the rest costs)
                work.start_soon(partial(every, SAMPLE_PERIOD, collector.sample, first=0))
                work.start_soon(partial(every, SWARM_PERIOD, SwarmPoller(node), first=1, abandon=True, fold=fold))
                if settings.coordinator:
                    work.start_soon(partial(every, VERIFIED_PERIOD, partial(read_verified, node), first=5, fold=fold))
            if settings.stats or settings.max_temp is not None or settings.pause_on_gpu_use:  # limits need it
                reader = TelemetryReader()
                work.start_soon(partial(every, TELEMETRY_PERIOD, partial(read_telemetry, node, reader), first=0,
                                        fold=fold))
            work.start_soon(partial(every, TELEMETRY_PERIOD, lambda: pauser.check_limits(collector.readings.telemetry),
                                    first=0.5))
            work.start_soon(every, LIFETIME_SAVE_PERIOD, collector.persist)
            work.start_soon(every, settings.checkpoint_interval, node.checkpoint)
            work.start_soon(partial(every, settings.announce_interval, node.announce, abandon=True))
            if dashboard is None:
                work.start_soon(every, settings.log_interval, lambda: events.write(stats_line(node.snapshot())))
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
                    lifetime=node.snapshot().lifetime.__dict__)
        views.cancel_scope.cancel()
    if stopping.by_user:  # a stop during a rebalance's or a failure's drain is still a stop
        return Outcome()
    if stopping.failure:
        return Outcome(node.info.uids, stopping.failure, pauser.reasons)
    if moves is None:
        return Outcome()
    return Outcome(tuple([uid for uid in node.info.uids if uid not in moves.drop] + list(moves.take)),
                   pause_reasons=pauser.reasons)


def _serving_gpus(node: VolunteerNode) -> set[int]:
    """The NVML indices of the GPUs this node serves on (heat and games count there only)."""
    return {int(d.removeprefix("cuda:")) for d in node.info.placement.devices if d.startswith("cuda:")}


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
        if node.state is not NodeState.SERVING:
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
        return dict(status=node.snapshot().to_dict())

    async def stop(request: dict[str, Any]) -> dict[str, Any]:
        logger.info("stop requested over the control socket")
        stopping.by_user_now()
        return dict(pid=os.getpid())

    async def pause(request: dict[str, Any]) -> dict[str, Any]:
        await trio.to_thread.run_sync(pauser.set, "user", "paused by the user")
        return dict(state=node.state.value, reasons=list(node.pause_reasons))

    async def resume(request: dict[str, Any]) -> dict[str, Any]:
        await trio.to_thread.run_sync(pauser.set, "user", None)
        return dict(state=node.state.value, reasons=list(node.pause_reasons))

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


async def _run_dashboard(node: VolunteerNode, stopping: Stopping, run_dashboard: DashboardRunner) -> None:
    async def snapshot() -> StatsSnapshot:
        return node.snapshot()

    notes = node.collector.note  # log lines and events go to the dashboard's events panel
    restore = divert_logs_for_dashboard(notes, node.paths.state_dir / "volunteer.log")
    node.events.sink = notes
    try:
        while True:  # after `q` the screen stays up, without keys, to show the drain
            if await run_dashboard(snapshot, keys=not stopping.by_user) == "quit":
                stopping.by_user_now()
    except OSError as e:  # the terminal is gone (SIGHUP follows): serving and the drain go on without it
        logger.warning(f"the dashboard stopped: {e}")
    finally:
        node.events.sink = None
        restore()
