"""The running volunteer's life cycle: start a node, supervise it, drain it, restart or stop.

``run_volunteer`` takes the state dir's lock, starts the node (on its ``NodeThread``), then runs
``supervise``: the pollers (``node.pollers``: the stats, the machine, the swarm), saving lifetime
totals and checkpoints, re-announcing; the control socket; the dashboard (a runner the CLI passes in,
so the running node never imports the views) or the headless JSON lines. A signal, ``volunteer stop``
or ``q`` starts the drain (state ``draining``): pollers stop, the node withdraws, checkpoints and
leaves, the views stay up until it is done. A second signal exits at once. A rebalance, or a node
whose hivemind machinery died (``_watch_node``), drains the same way and then starts a node again;
the owner's limits pause and resume it (``limits.Pauser``).

One trio loop for the client's whole life (``Life``): the signals, the control socket and each node's
supervision share its nursery, so a stop between two nodes is the same stop as while one serves.
Nodes are started and stopped on one long-lived ``NodeThread``: hivemind's DHT and p2pd children die
(PR_SET_PDEATHSIG) with the *thread* that forked them, and trio's worker threads come and go.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import threading
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
    unwrap,
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
from volunteer.node.reachability import ReachWatch
from volunteer.node.stats import NodeState, StatsSnapshot
from volunteer.planning.rebalance import Rebalance

# views.dashboard.run_dashboard: shows snapshots until ``q`` ("quit") or cancelled; keys=False: no keys
DashboardRunner = Callable[..., Awaitable[str | None]]

logger = logging.getLogger(__name__)
SAMPLE_PERIOD = 1.0
TELEMETRY_PERIOD = 2.0
SWARM_PERIOD = 10.0  # the dashboard's swarm panel
# headless, the swarm view only feeds the stats lines: each read is ~5 calls into the DHT process (about a
# third of an idle volunteer's CPU at 10 s, issue 16), so nobody watching reads it 3x less often
HEADLESS_SWARM_PERIOD = 30.0
VERIFIED_PERIOD = 30.0  # the coordinator's leaderboard line: every volunteer asks, so not too often
LIFETIME_SAVE_PERIOD = 5.0  # what a kill -9 can lose of the lifetime totals
REACH_PERIOD = 5.0  # how soon a NATed volunteer dials a trainer that has just published its address
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
    life = Life(settings, paths, events, dashboard, control, on_ready)
    try:
        return trio.run(life.run)
    except BaseExceptionGroup as group:  # the one error of the life's nursery, as the caller knows it
        error = unwrap(group)
        if error is group:
            raise
        raise error from None
    finally:
        life.close()
        lock.release()


class Life:
    """One trio loop for the whole client: signals, the control socket and each node's supervision
    share its nursery; nodes are started and stopped on one long-lived ``NodeThread``."""

    def __init__(self, settings: Settings, paths: Paths, events: EventLog | None, dashboard: DashboardRunner | None,
                 control: ControlServer, on_ready: Callable[[NodeInfo], None]):
        self.settings, self.paths, self.events, self.dashboard = settings, paths, events, dashboard
        self.control, self.on_ready = control, on_ready
        self.node: VolunteerNode | None = None
        self.info: NodeInfo | None = None
        self.stopping = Stopping()
        self.node_thread = NodeThread()
        self._restore_logs: Callable[[], None] | None = None

    async def run(self) -> NodeInfo | None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, self.stopping)
            await self._serve(nursery)
            nursery.cancel_scope.cancel()
        return self.info

    async def _serve(self, nursery: trio.Nursery) -> None:
        """Start a node, supervise it; again after a rebalance with the uids it chose, or after a failure."""
        settings, paths = self.settings, self.paths
        experiment = await self.node_thread.run(load_experiment, settings, paths)
        startup: list[str] = []
        if self.dashboard is not None:
            # hivemind's workers, forked below, keep the log handlers they are born with: give them
            # the log file now, or their warnings would tear the dashboard's screen
            log_file = paths.state_dir / "volunteer.log"
            print(f"joining the swarm of {experiment.manifest.name}; the dashboard follows (log: {log_file})",
                  flush=True)
            self._restore_logs = divert_logs_for_dashboard(startup.append, log_file)
        failures, prefer, pause_reasons, delay = FailureBudget(), (), None, 0.0
        while True:
            with trio.move_on_after(delay):  # a stop ends the wait before a restart
                await self.stopping.event.wait()
            if self.stopping.by_user:
                logger.info("stopped while no node was serving")
                return
            self.node = node = VolunteerNode(settings, paths, experiment, self.events, prefer=prefer)
            try:
                info = await self.node_thread.run(node.start)
            except Exception as e:
                await self.node_thread.run(node.shutdown)
                if self.info is None:  # the first start: bad input or a broken machine, said in one line
                    raise
                node.events.emit("restart_failed", f"restart failed: {type(e).__name__}: {e}", error=str(e))
                delay = failures.next_delay(f"restart failed: {e}")
                continue
            self.info = info
            if self.stopping.by_user:  # asked while it started: it never served, it only leaves
                await self.node_thread.run(node.shutdown)
                return
            for line in startup:  # warnings of the start, for the events panel
                node.collector.note(line)
            self.on_ready(info)
            if not self.control.serving:  # from the first start on; `volunteer status` works from "serving"
                await nursery.start(self.control.serve)
            outcome = await supervise(node, self.control, self.dashboard, pause_reasons, self.stopping)
            if not outcome.failure and not outcome.uids:
                return
            delay = failures.next_delay(outcome.failure) if outcome.failure else 0.0
            prefer, pause_reasons = outcome.uids, outcome.pause_reasons
            self.control.handlers = _restarting_handlers(node.snapshot().to_dict(), self.stopping)
            self.stopping.next_run()

    def close(self) -> None:
        """Whatever happened: the node leaves, the logs go back, the node thread ends."""
        if self.node is not None:
            self.node.shutdown()  # safe twice
        if self._restore_logs is not None:
            self._restore_logs()
        self.node_thread.close()


class NodeThread:
    """The one long-lived thread that starts and stops nodes.

    hivemind's DHT and p2pd die (PR_SET_PDEATHSIG) when the *thread* that forked them exits, and
    trio retires an idle worker thread after 10 s: a DHT started from ``trio.to_thread`` died then.
    Tried: a DHT started from a thread like this one stayed alive while trio's workers came and went."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="volunteer-node", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, action: Callable[..., Any], *args: Any) -> Any:
        """``action(*args)`` on this thread. Not cancellable: a start half done must end before it is undone."""
        token, done, result = trio.lowlevel.current_trio_token(), trio.Event(), {}

        def job() -> None:
            try:
                result["value"] = action(*args)
            except BaseException as e:
                result["error"] = e
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self._jobs.put(job)
        with trio.CancelScope(shield=True):
            await done.wait()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def close(self) -> None:
        self._jobs.put(None)


def _restarting_handlers(last: dict[str, Any], stopping: Stopping) -> dict[str, Any]:
    """The control socket while a restart waits and starts its node: ``status`` gives the last figures
    as state "restarting", ``stop`` stops the client as a signal would."""

    async def status(request: dict[str, Any]) -> dict[str, Any]:
        return dict(status={**last, "state": NodeState.RESTARTING.value, "time": time.time()})

    async def stop(request: dict[str, Any]) -> dict[str, Any]:
        logger.info("stop requested over the control socket while restarting")
        stopping.by_user_now("volunteer stop")
        return dict(pid=os.getpid())

    return dict(status=status, stop=stop)


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


async def supervise(node: VolunteerNode, control: ControlServer, dashboard: DashboardRunner | None,
                    pause_reasons: dict[str, str] | None, stopping: Stopping) -> Outcome:
    """Run until stopped or the node fails; drain, shut the node down, and say what comes next.

    ``control``: served already (``Life``); its handlers become this node's. ``pause_reasons``: those
    of the node before a restart; it starts paused while any holds."""
    settings, collector, events = node.settings, node.collector, node.events
    pauser = Pauser(node, settings, events.emit, pause_reasons, serving_gpus=_serving_gpus(node))
    if pauser.reasons:
        await trio.to_thread.run_sync(pauser.update, {})
    control.handlers = _control_handlers(node, stopping, pauser)
    async with trio.open_nursery() as views:
        node.report_serving()  # after the socket is up, so `volunteer status` works from this line on
        if dashboard is not None:
            views.start_soon(_run_dashboard, node, stopping, dashboard)
        async with trio.open_nursery() as work:
            fold = collector.fold  # what the pollers return goes in here, and only here
            if settings.stats:  # off: counters only (benchmarks measure what the rest costs)
                # a few counter reads: on the loop, not a worker thread's round trip every second
                work.start_soon(partial(every, SAMPLE_PERIOD, collector.sample, first=0, inline=True))
                swarm_period = SWARM_PERIOD if dashboard is not None else HEADLESS_SWARM_PERIOD
                work.start_soon(partial(every, swarm_period, SwarmPoller(node), first=1, abandon=True, fold=fold))
                if settings.coordinator:
                    work.start_soon(partial(every, VERIFIED_PERIOD, partial(read_verified, node), first=5, fold=fold))
            if settings.stats or settings.max_temp is not None or settings.pause_on_gpu_use:  # limits need it
                reader = TelemetryReader()
                work.start_soon(partial(every, _telemetry_period(settings, dashboard is not None),
                                        partial(read_telemetry, node, reader), first=0, fold=fold))
            if _has_limits(settings):  # none set: no reason can ever come up, nothing to wake up for
                work.start_soon(partial(every, TELEMETRY_PERIOD,
                                        lambda: pauser.check_limits(collector.readings.telemetry), first=0.5))
            work.start_soon(every, LIFETIME_SAVE_PERIOD, collector.persist)
            work.start_soon(every, settings.checkpoint_interval, node.checkpoint)
            work.start_soon(partial(every, settings.announce_interval, node.announce, abandon=True))
            work.start_soon(partial(every, REACH_PERIOD, ReachWatch(node).reading, first=0, abandon=True, fold=fold))
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
        final = node.snapshot()
        events.emit("stopped", closing_line(final, time.monotonic() - started, _why(stopping)),
                    lifetime=final.lifetime.__dict__, session=final.session.__dict__, reason=_why(stopping))
        views.cancel_scope.cancel()
    if stopping.by_user:  # a stop during a rebalance's or a failure's drain is still a stop
        return Outcome()
    if stopping.failure:
        return Outcome(node.info.uids, stopping.failure, pauser.reasons)
    if moves is None:
        return Outcome()
    return Outcome(tuple([uid for uid in node.info.uids if uid not in moves.drop] + list(moves.take)),
                   pause_reasons=pauser.reasons)


def _has_limits(settings) -> bool:
    """Whether any of the owner's automatic pause reasons (``limits.automatic_pause_reasons``) is set."""
    return settings.hours is not None or settings.max_temp is not None or settings.pause_on_gpu_use


def _telemetry_period(settings, watched: bool) -> float:
    """Every ``TELEMETRY_PERIOD`` for the dashboard and the GPU limits (heat, games); headless without
    them the readings only go into the stats lines, so once a line is enough (idle CPU, issue 16)."""
    if watched or settings.max_temp is not None or settings.pause_on_gpu_use:
        return TELEMETRY_PERIOD
    return max(TELEMETRY_PERIOD, settings.log_interval)


def _serving_gpus(node: VolunteerNode) -> set[int]:
    """The NVML indices of the GPUs this node serves on (heat and games count there only)."""
    return {d.index for d in node.info.placement.devices if d.is_gpu}


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
        stopping.by_user_now("volunteer stop")
        return dict(pid=os.getpid())

    async def pause(request: dict[str, Any]) -> dict[str, Any]:
        await trio.to_thread.run_sync(pauser.set, "user", "paused by the user")
        return dict(state=node.state.value, reasons=list(node.pause_reasons))

    async def resume(request: dict[str, Any]) -> dict[str, Any]:
        await trio.to_thread.run_sync(pauser.set, "user", None)
        return dict(state=node.state.value, reasons=list(node.pause_reasons))

    return dict(status=status, stop=stop, pause=pause, resume=resume)


def _why(stopping: Stopping) -> str:
    if stopping.by_user:
        return stopping.why
    if stopping.failure:
        return f"restarting: {stopping.failure}"
    return "moving to other experts" if stopping.rebalance else "stopped"


def closing_line(final: StatsSnapshot, drain_seconds: float, why: str) -> str:
    """The one line a person reads when the client has left: why, how long leaving took, what was done."""
    session, lifetime = final.session, final.lifetime
    return (f"stopped ({why}): left the swarm in {drain_seconds:.1f} s; this session served "
            f"{session.forward_samples:,} forward and {session.backward_samples:,} backward samples in "
            f"{_duration(session.uptime_seconds)}; all runs: {lifetime.forward_samples:,} forward, "
            f"{lifetime.backward_samples:,} backward in {_duration(lifetime.uptime_seconds)}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


class Stopping:
    """Why the supervisor is leaving: the owner asked (signal, `volunteer stop`, `q`), or a rebalance
    or a failure wants a restart. One for the client's life (``next_run`` between nodes). A stop by the owner always wins, and only a second one exits without draining."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.by_user = False
        self.rebalance: Rebalance | None = None  # the moves to make before serving again
        self.failure: str | None = None  # what broke, when the node must be restarted
        self.why = ""  # what the owner did to stop it, for the closing line

    def by_user_now(self, why: str = "stop asked") -> None:
        self.why = self.why or why
        self.by_user = True
        self.event.set()

    def for_rebalance(self, moves: Rebalance) -> None:
        self.rebalance = moves
        self.event.set()

    def for_failure(self, failure: str) -> None:
        self.failure = failure
        self.event.set()

    def next_run(self) -> None:
        """A restart: the next node's run starts afresh, unless the owner asked to stop meanwhile."""
        if not self.by_user:
            self.event, self.rebalance, self.failure = trio.Event(), None, None


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
            stopping.by_user_now(signal.Signals(signum).name)


async def _run_dashboard(node: VolunteerNode, stopping: Stopping, run_dashboard: DashboardRunner) -> None:
    async def snapshot() -> StatsSnapshot:
        return node.snapshot()

    notes = node.collector.note  # log lines and events go to the dashboard's events panel
    restore = divert_logs_for_dashboard(notes, node.paths.state_dir / "volunteer.log")
    node.events.attach(notes)
    try:
        while True:  # after `q` the screen stays up, without keys, to show the drain
            if await run_dashboard(snapshot, keys=not stopping.by_user) == "quit":
                stopping.by_user_now("q pressed")
    except OSError as e:  # the terminal is gone (SIGHUP follows): serving and the drain go on without it
        logger.warning(f"the dashboard stopped: {e}")
    finally:
        node.events.detach()
        restore()
