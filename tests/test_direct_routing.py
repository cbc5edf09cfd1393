"""The trainer prefers direct servers of a uid (issue 12 item 3): the routing choice over real signed
``ServerRecord`` values, and the ``reachable`` flag a volunteer signs, through one real DHT peer.

No call is made: a ``Replica``'s expert is a hivemind ``RemoteExpert`` with no p2p behind it, which the
routing never touches.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from hivemind import DHT
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p import PeerID

from coordinator_seeds.dispatch import shutdown_dht
from coordinator_seeds.replicas import (
    Replica,
    next_replica,
    plan_replica_calls,
    preferred,
)
from volunteer.core.expert_records import (
    group_key,
    parse_group,
    publish_servers,
    read_servers,
)
from volunteer.core.records import join_dht, visible_maddrs
from volunteer.node.reachability import Reach

UID = "p_ffn0.0.1"
PEERS = {name: PeerID(bytes([0, 8]) + name.encode() * 8).to_base58() for name in "abcd"}  # identity multihashes


def replicas(*servers: tuple[str, float, bool]) -> list[Replica]:
    """One replica of ``UID`` per ``(name, declared rate, reachable)``, read back from a signed group."""
    items = [(f"[owner:{name}]".encode(), dict(peer_id=PEERS[name], device="cpu", reachable=reachable, paused=False,
                                                audit=1, uids={UID: rate})) for name, rate, reachable in servers]
    records = {r.peer_id: r for r in parse_group(group_key("p", UID), items)}
    return [Replica(records[PEERS[name]], RemoteExpert(ExpertInfo(UID, PeerID.from_base58(PEERS[name])), None))
            for name, _, _ in servers]


def shares(servers: list[Replica], tokens: int = 96) -> dict[str, int]:
    chosen = torch.zeros(tokens, 1, dtype=torch.int64)  # every token picked uid 0
    counts = {r.peer_id: 0 for r in servers}
    for call in plan_replica_calls(chosen, {0: servers}, max_batch_size=4096):
        counts[call.replica.peer_id] += len(call.tokens)
    return {name: counts[peer] for name, peer in PEERS.items() if peer in counts}


def test_a_uids_tokens_go_to_its_direct_servers_by_rate_when_it_has_any() -> None:
    # a and b are dialable; c is faster but reached over its own outbound connection
    servers = replicas(("a", 10.0, True), ("b", 30.0, True), ("c", 100.0, False))
    assert [r.peer_id for r in preferred(servers)] == [PEERS["a"], PEERS["b"]]
    assert shares(servers) == {"a": 24, "b": 72, "c": 0}  # the rate still weighs the split among the direct
    servers[1].observe(10, 1.0)  # b measured at 10/s: below what it declares, so it counts
    assert shares(servers) == {"a": 48, "b": 48, "c": 0}


def test_indirect_servers_serve_when_no_direct_one_is_alive() -> None:
    servers = replicas(("c", 10.0, False), ("d", 30.0, False))
    assert shares(servers) == {"c": 24, "d": 72}
    direct_left = replicas(("a", 10.0, True), ("c", 10.0, False))[1:]  # a evicted or gone
    assert shares(direct_left) == {"c": 96}


def test_failover_tries_direct_servers_before_indirect_ones() -> None:
    a, b, c, d = replicas(("a", 10.0, True), ("b", 5.0, True), ("c", 100.0, False), ("d", 50.0, False))
    servers = [a, b, c, d]
    assert next_replica(servers, {a}) is b  # slower, but direct
    assert next_replica(servers, {a, b}) is c  # then the fastest indirect one
    assert next_replica(servers, {a, b, c}) is d
    assert next_replica(servers, {a, b, c, d}) is None


def test_a_volunteer_signs_reachable_only_when_its_reading_is_direct() -> None:
    assert [reach.value for reach in Reach if reach.announced_direct] == ["checking", "direct"]


@pytest.fixture
def dht() -> Iterator[DHT]:
    """A client of a one-peer swarm (a lone peer stores nothing)."""
    bootstrap = join_dht("p")
    try:
        client = join_dht("p", visible_maddrs(bootstrap), client_mode=True)
        yield client
        shutdown_dht(client)
    finally:
        shutdown_dht(bootstrap)


def test_the_reachable_flag_survives_the_signed_record(dht: DHT) -> None:
    """About 2 s: a volunteer's signed records as a trainer reads them."""
    uids = [UID, "p_ffn0.0.70"]  # two groups: in one, the second record would replace the first
    peer_id = dht.peer_id.to_base58()
    publish_servers(dht, "p", uids[:1], peer_id=peer_id, device="cpu", samples_per_second=5.0,
                    reachable=Reach.OUTBOUND.announced_direct)
    publish_servers(dht, "p", uids[1:], peer_id=peer_id, device="cpu", samples_per_second=5.0)
    found = read_servers(dht, "p", uids)
    assert [(r.uid, r.reachable) for uid in uids for r in found[uid]] == [(UID, False), ("p_ffn0.0.70", True)]
