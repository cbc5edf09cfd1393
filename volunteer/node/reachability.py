"""How trainers reach this volunteer, and making sure they can when it sits behind a home router.

A volunteer behind a NAT with no port forward announces only private addresses: a trainer that looks
its experts up gets its peer id, asks its p2p daemon for a stream, and the daemon fails at once with
``routing: not found``. Measured in the network lab (tests/test_netlab.py), hivemind 1.1.12's own
escape hatches do not help: a relay slot comes after ~3 minutes and its streams are cut at 128 KiB
(a trainer call carries ~256 KiB), and hole punching waits for a public address that never comes.

What works is what BOINC and Folding@home do: the volunteer dials out. Trainers listen on public
addresses and publish them (``records.publish_caller``); this module reads those records and has the
p2p daemon connect to every trainer, again whenever a connection is gone. libp2p streams open in either
direction on an existing connection, and a daemon asked for a stream to a connected peer uses that
connection without any address lookup, so the trainer's expert calls come back over the connection the
volunteer made: no relay, no size limit, hivemind's daemon and DHT only.

At start (and every ``DIAL_BACK_PERIOD``) the coordinator seed is asked to dial back the volunteer's
port at the address the request came from (``POST /v1/dialback``): the answer decides whether the
volunteer is ``direct`` or has to rely on its outbound connections.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Sequence

from volunteer.core import records
from volunteer.core.seed_client import CoordinatorError, DialBack, dial_back

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # one dial of a trainer; NATed volunteers redial at every tick anyway
DIAL_BACK_PERIOD = 300.0  # a router's port forward can be added (or lost) while the volunteer runs
# Each tick asks the DHT process twice (a ping of the seeds, the trainers' record): with the swarm panel's
# reads, most of an idle volunteer's CPU (issue 16). Once the same view came back ``SETTLED_TICKS`` ticks in
# a row, ticks do the work every ``SETTLED_PERIOD`` only; any change goes back to every tick. So a new
# trainer is dialled, or an outage seen, within 20 s instead of 5 s while nothing moves: trainers look
# their experts up every 15 s anyway.
SETTLED_TICKS = 3
SETTLED_PERIOD = 20.0
REPUBLISH_PERIOD = 15.0  # our reach record lives RECORD_TTL (60 s): below SETTLED_PERIOD, so every settled tick renews it


class Reach(str, enum.Enum):
    CHECKING = "checking"  # not known yet
    DIRECT = "direct"  # the seed dialled our announced port: anyone can
    OUTBOUND = "outbound"  # not dialable, but connected to every trainer that publishes an address
    RELAYED = "relayed"  # reachable only through a circuit relay (small calls only: 128 KiB a stream)
    UNREACHABLE = "unreachable"  # not dialable and no trainer connected: no trainer can call us

    @property
    def announced_direct(self) -> bool:
        """The ``reachable`` flag of our signed server records: trainers send a uid's tokens to its direct
        servers when it has any. Not known yet counts as direct, as before reachability was measured."""
        return self in (Reach.CHECKING, Reach.DIRECT)


@dataclass(frozen=True)
class ReachView:
    """What the dashboard, ``volunteer status`` and the JSON events show of this volunteer's reachability."""

    reach: str
    advice: str
    observed_host: str | None  # our address as the seed saw it (the router's, behind a NAT)
    port: int | None  # the TCP port we listen on (what to forward)
    trainers: int  # trainers that publish an address
    connected: int  # of those, how many we hold a connection to
    seeds_answering: int | None = None  # initial peers that answered a DHT ping this tick; 0 = offline

    def to_dict(self) -> dict:
        return asdict(self)


def classify(dialled_back: bool | None, trainers: int, connected: int, relayed: bool = False,
             offline: bool = False) -> Reach:
    """The one word for how trainers reach us (pure: the tests' table covers every case)."""
    if offline:  # no bootstrap peer answers: whatever held before, nobody reaches us now
        return Reach.UNREACHABLE
    if dialled_back:
        return Reach.DIRECT
    if trainers and connected:
        return Reach.OUTBOUND
    if relayed:
        return Reach.RELAYED
    if trainers:
        return Reach.UNREACHABLE
    # no trainer runs: nobody to dial yet; we will when one publishes its address
    return Reach.CHECKING if dialled_back is None else Reach.OUTBOUND


def advice(reach: Reach, observed_host: str | None, port: int | None, trainers: int, connected: int,
           offline: bool = False) -> str:
    """One line for people: how we are reached, and what would make it direct."""
    if offline:
        return ("no bootstrap peer of the swarm answers: check this machine's network connection; "
                "serving resumes by itself when it is back")
    forward = ""
    if port:
        where = observed_host or "your public address"
        forward = (f"; for a direct path forward TCP port {port} of your router to this machine and start with "
                   f"--port {port} --announce-host {where}")
    if reach is Reach.DIRECT:
        return f"trainers dial {observed_host or 'this machine'}:{port} directly"
    if reach is Reach.OUTBOUND:
        held = f"holding connections to {connected} of {trainers} trainers" if trainers else "no trainer runs yet"
        return f"not reachable from the internet; {held}, they call back over them{forward}"
    if reach is Reach.UNREACHABLE:
        return f"not reachable from the internet and no trainer could be dialled ({trainers} known){forward}"
    if reach is Reach.RELAYED:
        return f"reachable through a relay only, which carries small calls only{forward}"
    return "finding out how trainers reach this volunteer"


class OutboundLinks:
    """Keeps this node's p2p daemon connected to every trainer of the experiment; ``tick`` runs once.

    ``run`` executes a coroutine on a loop that lives as long as the node (hivemind's
    ``RemoteExpertWorker``): the daemon client made for it stays bound to that loop."""

    def __init__(self, dht, dht_prefix: str, run: Callable | None = None):
        self.dht, self.dht_prefix = dht, dht_prefix
        self.peer_id = dht.peer_id.to_base58()
        if run is None:
            from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

            run = RemoteExpertWorker.run_coroutine
        self._run = run
        self._p2p = None

    def tick(self) -> tuple[int, int]:
        """Dial every trainer we are not connected to; returns (trainers, connected)."""
        callers = [c for c in records.read_callers(self.dht, self.dht_prefix) if c.peer_id != self.peer_id]
        fresh = [c for c in callers if time.time() - c.time < 2 * records.RECORD_TTL]
        return self._run(self._connect_all(fresh))

    async def _connect_all(self, callers: Sequence[records.Caller]) -> tuple[int, int]:
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        if self._p2p is None:
            self._p2p = await self.dht.replicate_p2p()
        connected = {str(info.peer_id) for info in await self._p2p.list_peers()}
        dials = []
        for caller in callers:
            if caller.peer_id in connected:
                continue
            # the daemon's connect takes transport addresses: a /p2p/<id> tail breaks its decoder
            maddrs = [Multiaddr(m.split("/p2p/")[0]) for m in caller.maddrs if "/p2p-circuit" not in m]
            dials.append(asyncio.wait_for(self._p2p._client.connect(PeerID.from_base58(caller.peer_id), maddrs),
                                          CONNECT_TIMEOUT))
        for caller, result in zip([c for c in callers if c.peer_id not in connected],
                                  await asyncio.gather(*dials, return_exceptions=True)):
            if isinstance(result, BaseException):
                logger.info(f"cannot dial trainer {caller.peer_id}: {type(result).__name__}: {result}")
        now = {str(info.peer_id) for info in await self._p2p.list_peers()}
        return len(callers), sum(c.peer_id in now for c in callers)


class ReachWatch:
    """Called every few seconds by the supervisor: holds the outbound links, checks dial-back now and
    then, and reports changes (an event, the collector's view, our ``reach`` record in the DHT)."""

    def __init__(self, node, links: OutboundLinks | None = None, *,
                 check: Callable[[str, Sequence[int]], DialBack] = dial_back,
                 clock: Callable[[], float] = time.monotonic):
        self.node, self.check, self.clock = node, check, clock
        self.links = links
        self.dialled_back: bool | None = None
        self.observed_host: str | None = None
        self._checked_at = self._published_at = self._ticked_at = -float("inf")
        self.view: ReachView | None = None
        self._same = 0  # full ticks in a row that gave the same view (``SETTLED_TICKS``)

    @property
    def port(self) -> int | None:
        return _tcp_port(self.node.info.maddrs)

    def __call__(self) -> ReachView:
        if self._same >= SETTLED_TICKS and self.clock() - self._ticked_at < SETTLED_PERIOD:
            return self.view
        self._ticked_at = self.clock()
        node = self.node
        if self.links is None and node.settings.dial_trainers:
            self.links = OutboundLinks(node.dht, node.manifest.dht_prefix)
        if self.clock() - self._checked_at >= DIAL_BACK_PERIOD:
            self._dial_back()
        answering = self.rejoin()
        offline = answering == 0
        trainers, connected = self.links.tick() if self.links is not None and not offline else (0, 0)
        relayed = any("/p2p-circuit" in m for m in node.info.maddrs)
        reach = classify(self.dialled_back, trainers, connected, relayed, offline)
        node.reach = reach  # what the node's next server announcement says (``Reach.announced_direct``)
        view = ReachView(reach.value, advice(reach, self.observed_host, self.port, trainers, connected, offline),
                         self.observed_host, self.port, trainers, connected, answering)
        changed = self.view is None or (view.reach, view.connected, view.trainers) != (
            self.view.reach, self.view.connected, self.view.trainers)
        if changed:
            node.events.emit("reachability", f"reachability: {view.reach} ({view.advice})", **view.to_dict())
        self._same = 1 if changed or view.seeds_answering != self.view.seeds_answering else self._same + 1
        if self.view is None or view.reach != self.view.reach or self.clock() - self._published_at >= REPUBLISH_PERIOD:
            self._publish(view)
        self.view = view
        return view

    def reading(self) -> dict[str, Any]:
        """One poll, as what the supervisor folds into the stats (``Readings.reach``)."""
        return dict(reach=self().to_dict())

    def rejoin(self) -> int | None:
        """Ping the bootstrap peers from our DHT (which puts those that answer back in its routing table):
        after a network outage hivemind's DHT has dropped every peer and never looks for them again, so
        it would stay alone, our expert records would expire, and no trainer would find us. Returns how
        many answered; None if there are none to ask."""
        peers = tuple(self.node.experiment.initial_peers)
        if not peers or self.node.dht is None:
            return None
        return self.node.dht.run_coroutine(partial(_ping_bootstrap_peers, peers))

    def _publish(self, view: ReachView) -> None:
        try:
            records.publish_reach(self.node.dht, self.node.manifest.dht_prefix, self.node.info.peer_id, view.reach)
            self._published_at = self.clock()
        except Exception as e:  # the DHT may be restarting: the next tick publishes
            logger.debug(f"publishing our reach record failed: {e}")

    def _dial_back(self) -> None:
        self._checked_at = self.clock()
        url, port = self.node.settings.coordinator, self.port
        if not url or not port:
            self.dialled_back = False if self.dialled_back is None else self.dialled_back
            return
        try:
            answer = self.check(url, [port])
        except CoordinatorError as e:  # an old seed without the endpoint, or one that is down: keep the last answer
            logger.info(f"the seed could not check whether it can dial us back: {e}")
            if self.dialled_back is None:
                self.dialled_back = False
            return
        self.dialled_back = port in answer.open_ports
        self.observed_host = answer.observed_host


async def _ping_bootstrap_peers(maddrs: Sequence[str], dht, node) -> int:
    """Runs inside the DHT's process: reconnect to and ping each bootstrap peer; how many answered."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    async def ping(maddr: str) -> bool:
        peer = PeerID.from_base58(Multiaddr(maddr)["p2p"])
        if peer not in node.protocol.routing_table.peer_id_to_uid:
            try:  # the daemon may have forgotten the peer's address while the network was down
                await asyncio.wait_for(node.p2p._client.connect(peer, [Multiaddr(maddr.split("/p2p/")[0])]),
                                       CONNECT_TIMEOUT)
            except Exception as e:
                logger.debug(f"cannot reconnect to bootstrap peer {maddr}: {e}")
                return False
        return await node.protocol.call_ping(peer) is not None

    return sum(await asyncio.gather(*(ping(m) for m in maddrs)))


def _tcp_port(maddrs: Sequence[str]) -> int | None:
    """The TCP port of our first non-loopback address (announced addresses come first)."""
    for maddr in sorted(maddrs, key=lambda m: "/ip4/127." in m):
        parts = maddr.split("/")
        if "tcp" in parts:
            try:
                return int(parts[parts.index("tcp") + 1])
            except (IndexError, ValueError):
                continue
    return None
