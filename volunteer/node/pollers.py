"""What the supervisor reads while a node serves: each poller returns what it read, nothing more.

``supervisor.supervise`` runs them every few seconds in worker threads and folds each return value
into the node's ``StatsCollector`` (``every(..., fold=...)``), the one place the figures change.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import trio

from volunteer.core.seed_client import CoordinatorError, Verified, fetch_verified
from volunteer.host.telemetry import Telemetry, TelemetryReader
from volunteer.node import swarm
from volunteer.node.node import VolunteerNode
from volunteer.node.stats import PlanView, StatsSnapshot, SwarmView

logger = logging.getLogger(__name__)


class SwarmPoller:
    """Reads the swarm panel's figures and reports volunteers that come and go."""

    def __init__(self, node: VolunteerNode):
        self.node = node
        self.known: set[str] | None = None

    def __call__(self) -> dict[str, SwarmView]:
        node = self.node
        view, others = swarm.read_swarm_view(node.dht, node.manifest.dht_prefix, node.manifest.all_uids(),
                                             node.info.uids, node.info.peer_id)
        if self.known is not None:
            for peer in sorted(self.known - others):
                node.events.emit("peer_lost", f"volunteer {peer} left the swarm", peer_id=peer)
            for peer in sorted(others - self.known):
                node.events.emit("peer_joined", f"volunteer {peer} joined the swarm", peer_id=peer)
        self.known = others
        return dict(swarm=view)


def read_verified(node: VolunteerNode) -> dict[str, Verified]:
    """This volunteer's leaderboard line; nothing (the last line read stays on screen) on a failure."""
    try:
        return dict(verified=fetch_verified(node.settings.coordinator, node.info.peer_id))
    except CoordinatorError as e:
        logger.debug(str(e))
        return {}


def read_telemetry(node: VolunteerNode, reader: TelemetryReader) -> dict[str, Any]:
    """The machine's readings, and each plan next to the memory measured on its device."""
    telemetry: Telemetry = reader.read()
    plans = tuple(PlanView(plan, check) for plan, check in zip(node.info.placement.plans, node.check_plans()))
    return dict(telemetry=telemetry, plans=plans)


def stats_line(snapshot: StatsSnapshot) -> dict[str, Any]:
    """The headless JSON line of a snapshot."""
    figures = snapshot.to_dict()
    del figures["plans"], figures["events"]  # the plans are in the serving event; events are lines of their own
    return {"event": "stats", **figures}


async def every(period: float, action: Callable[[], object], *, first: float | None = None,
                abandon: bool = False, fold: Callable[..., None] | None = None, inline: bool = False) -> None:
    """Run ``action`` in a worker thread every ``period`` seconds, the first time after ``first``;
    ``fold``: what to do with what it returns (a dict of ``stats.Readings`` fields).

    ``abandon``: on cancel, stop waiting for a call in flight. For DHT reads and writes, which block
    for ever once the DHT process is dead: the drain must not wait for them. ``inline``: run it on the
    loop itself, for actions of microseconds that never block (no thread hand-off and wake-up)."""
    await trio.sleep(period if first is None else first)
    while True:
        try:
            value = action() if inline else await trio.to_thread.run_sync(action, abandon_on_cancel=abandon)
            if fold is not None and value:
                fold(**value)
        except Exception as e:  # one failed poll, save or announce must not stop serving
            logger.warning(f"{getattr(action, '__name__', type(action).__name__)} failed: {type(e).__name__}: {e}")
        await trio.sleep(period)
