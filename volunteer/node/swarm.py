"""The swarm as one volunteer sees it: how many servers each uid has, how fast the swarm serves it,
and what the dashboard's swarm panel shows. Reads the records of ``volunteer.core.records``."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Callable, Collection, Sequence

from hivemind import DHT

from volunteer.core.dht_calls import (
    MAX_KEYS_PER_CALL,
    active_successors,
    get_many,
    wait_result,
)
from volunteer.core.expert_records import read_servers
from volunteer.core.records import (
    VolunteerRecord,
    read_trainer_progress,
    read_volunteers,
)
from volunteer.node.stats import SwarmView


def served_throughput(volunteers: Sequence[VolunteerRecord], uids: Sequence[str]) -> dict[str, float]:
    """Samples/s the swarm serves each uid with: every volunteer's measured rate, shared evenly among
    the uids it serves (its record gives one rate for all its devices). 0 for a uid nobody with a record
    serves."""
    rates = dict.fromkeys(uids, 0.0)
    for record in volunteers:
        share = record.samples_per_second / len(record.uids) if record.uids else 0.0
        for uid in record.uids:
            if uid in rates:
                rates[uid] += share
    return rates


ROWS_PER_READ = 16  # row records one periodic coverage read looks at per layer: bounded, whatever the grid size


class GridCoverage:
    """Which uids of the grid hivemind's expert records say are served, learned from the grid's prefix
    records a bounded number of keys per read, so the cost does not grow with the grid.

    A read of a layer looks at its root prefix (``L.``: one key, the active rows) and at most
    ``rows_per_read`` row prefixes (``L.3.``: the served uids of row 3), taking the active rows in turn
    from one read to the next; a uid seen stays counted for ``forget_after`` seconds (the rows not read
    this time keep their last reading). A one-dimensional layer has no row records: ``rows_per_read``
    of its uids are read in turn instead. Deeper grids walk their prefixes level by level the same way.
    """

    def __init__(self, uids: Sequence[str], *, rows_per_read: int = ROWS_PER_READ, forget_after: float = 90.0,
                 clock: Callable[[], float] = time.monotonic):
        self.rows_per_read, self.forget_after, self.clock = rows_per_read, forget_after, clock
        self.layers: dict[str, list[str]] = defaultdict(list)
        for uid in uids:
            self.layers[uid.split(".", 1)[0] + "."].append(uid)
        self.valid = frozenset(uids)
        # rows of each grid's first dimension: hivemind keeps no record of them (our servers add one,
        # ``dht_calls.declare_grid_roots``; a plain hivemind server does not), so they are also read in turn
        self.rows = {root: 1 + max(int(uid.split(".")[1]) for uid in layer) for root, layer in self.layers.items()}
        self.seen: dict[str, float] = {}  # uid -> when a record last said it is served
        self._cursor: dict[str, int] = defaultdict(int)

    def read(self, dht: DHT, rows_per_read: int | None = None) -> set[str]:
        """Read a bounded share of the records (``rows_per_read`` rows a layer, this time only, if given:
        a node's start reads more); the uids seen served recently."""
        now, usual = self.clock(), self.rows_per_read
        self.rows_per_read = rows_per_read or usual
        try:
            served = self._served_now(dht)
        finally:
            self.rows_per_read = usual
        for uid in served:
            if uid in self.valid:
                self.seen[uid] = now
        self.seen = {uid: t for uid, t in self.seen.items() if now - t <= self.forget_after}
        return set(self.seen)

    def _served_now(self, dht: DHT) -> set[str]:
        flat = [root for root, uids in self.layers.items() if uids[0].count(".") == 1]
        gridded = [root for root in self.layers if root not in flat]
        served: set[str] = set()
        for root in flat:  # no prefix records to read: a window of the uids themselves
            window = self._take(root, self.layers[root])
            found = get_many(dht, window, latest=True)
            served.update(uid for uid in window if found.get(uid) is not None and isinstance(found[uid].value, str))
        frontier = {root: [root] for root in gridded}
        while frontier:
            prefixes = [p for root in frontier for p in frontier[root]]
            successors = active_successors(dht, prefixes)
            deeper: dict[str, list[str]] = {}
            for root, level in frontier.items():
                for prefix in level:
                    for coord, (uid, _peer) in successors[prefix].items():
                        if prefix.count(".") == uid.count("."):  # a row record: it names its uids
                            served.add(uid)
                        else:
                            deeper.setdefault(root, []).append(f"{prefix}{coord}.")
            if all(p in self.layers for p in prefixes):  # the first level: add the rows no root names
                deeper = {root: self._first_rows(root, deeper.get(root, [])) for root in gridded}
            else:
                deeper = {root: self._take(root, sorted(level)) for root, level in deeper.items()}
            frontier = {root: level for root, level in deeper.items() if level}
        return served

    def _first_rows(self, root: str, active: list[str]) -> list[str]:
        """The rows the root names active, then the others in turn, ``rows_per_read`` in all."""
        limit = min(self.rows_per_read, MAX_KEYS_PER_CALL)
        every = [f"{root}{row}." for row in range(self.rows[root])]
        if len(every) <= limit:
            return every
        active = self._take(root + "active", sorted(set(active)))
        rest = [row for row in self._take(root + "rows", every) if row not in set(active)]
        return active + rest[: limit - len(active)]

    def _take(self, root: str, items: list[str]) -> list[str]:
        """At most ``rows_per_read`` of ``items``, the next ones after those taken last time."""
        limit = min(self.rows_per_read, MAX_KEYS_PER_CALL)
        if len(items) <= limit:
            return items
        start = self._cursor[root] % len(items)
        self._cursor[root] = start + limit
        return (items[start:] + items[:start])[:limit]


def count_servers(dht: DHT, dht_prefix: str, uids: Sequence[str],
                  volunteers: Sequence[VolunteerRecord] | None = None,
                  coverage: GridCoverage | None = None) -> Counter:
    """How many live servers each uid has: volunteer records (one DHT key for the whole swarm), plus
    hivemind's expert records as ``coverage`` reads them (a bounded number of prefix keys per read;
    they name only the latest server of a uid, but also see servers that publish no record)."""
    counts: Counter = Counter()
    wanted = set(uids)
    for record in read_volunteers(dht, dht_prefix) if volunteers is None else volunteers:
        counts.update(uid for uid in set(record.uids) if uid in wanted)
    for uid in (coverage or GridCoverage(uids)).read(dht):
        if uid in wanted and counts[uid] == 0:
            counts[uid] = 1
    return Counter({uid: counts[uid] for uid in uids})


async def _routing_table_size(_dht: DHT, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


def visible_peers(dht: DHT) -> int:
    """DHT peers this node knows (its routing table), without a network round trip."""
    return wait_result(dht, dht.run_coroutine(_routing_table_size, return_future=True), "counting peers")


def read_swarm_view(dht: DHT, dht_prefix: str, all_uids: Sequence[str], my_uids: Sequence[str],
                    my_peer_id: str) -> tuple[SwarmView, set[str]]:
    """What the dashboard's swarm panel shows, and the peer ids of the other volunteers seen."""
    volunteers = read_volunteers(dht, dht_prefix)
    counts, _served = signed_swarm(dht, dht_prefix, all_uids)  # a hijacker of hivemind's records counts for nothing
    for uid in my_uids:  # our own record may not have propagated yet; we do serve these
        counts[uid] = max(counts[uid], 1)
    progress = read_trainer_progress(dht, dht_prefix)
    others = {v.peer_id for v in volunteers if v.peer_id != my_peer_id}
    view = SwarmView(
        dht_peers=visible_peers(dht), volunteers=len(others) + 1, grid_size=len(all_uids),
        covered=sum(1 for uid in all_uids if counts[uid] > 0), replicas={uid: counts[uid] for uid in my_uids},
        trainer_step=progress.step if progress else None, trainer_loss=progress.loss if progress else None,
        trainer_seen=progress.time if progress else None,
    )
    return view, others


# --- the signed view (issue 14): what balancing counts --------------------------------------------


def signed_swarm(dht: DHT, dht_prefix: str, uids: Sequence[str], banned: Collection[str] = ()
                 ) -> tuple[Counter, dict[str, float]]:
    """Servers and served samples/s per uid, from the signed server records only, minus banned keys:
    a peer that re-declares a uid in hivemind's unsigned records, or a banned cheater, does not make a
    uid look served, so volunteers still come to serve it."""
    found = read_servers(dht, dht_prefix, list(uids), banned=banned)
    counts = Counter({uid: len(found[uid]) for uid in uids})
    rates = {uid: sum(r.samples_per_second for r in found[uid]) for uid in uids}
    return counts, rates
