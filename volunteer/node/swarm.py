"""The swarm as one volunteer sees it: how many servers each uid has, how fast the swarm serves it,
and what the dashboard's swarm panel shows. Reads the records of ``volunteer.core.records``."""

from __future__ import annotations

from collections import Counter
from typing import Collection, Sequence

from hivemind import DHT
from hivemind.moe.server.dht_handler import get_experts

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


def count_servers(dht: DHT, dht_prefix: str, uids: Sequence[str],
                  volunteers: Sequence[VolunteerRecord] | None = None) -> Counter:
    """How many live servers each uid has: volunteer records, plus hivemind's expert records
    (which name only the latest server of a uid, but also see servers that publish no record)."""
    counts: Counter = Counter()
    for record in read_volunteers(dht, dht_prefix) if volunteers is None else volunteers:
        counts.update(uid for uid in set(record.uids) if uid in uids)
    for uid, expert in zip(uids, get_experts(dht, list(uids), expiration_time=float("inf"))):
        if expert is not None and counts[uid] == 0:
            counts[uid] = 1
    return Counter({uid: counts[uid] for uid in uids})


async def _routing_table_size(_dht: DHT, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


def visible_peers(dht: DHT) -> int:
    """DHT peers this node knows (its routing table), without a network round trip."""
    return dht.run_coroutine(_routing_table_size)


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
