"""Swarm balancing on loopback: volunteers joining one after another fill the grid before replicating,
and when one leaves, a running volunteer moves its replica to an unserved uid (a rebalance, keeping
its other experts' weights) and a newcomer covers the rest, all within a bounded time."""

from __future__ import annotations

import pytest

from tests.conftest import cli, serving_event, wait_for
from volunteer.core.harness import start_volunteer
from volunteer.node import swarm

pytestmark = pytest.mark.integration


def test_three_volunteers_fill_the_grid_then_cover_a_leaver(seed, client, short_home, tmp_path, processes):
    url, experiment = seed
    grid = set(experiment.manifest.all_uids())  # 8 uids
    assert len(grid) == 8
    homes = {name: tmp_path / name for name in ("v1", "v2", "v4")}
    homes["v3"] = short_home
    uids, children = {}, {}
    for name, count in (("v1", "3"), ("v2", "3"), ("v3", "3")):
        period = "3" if name == "v3" else "0"  # only v3 looks for a better choice, and often
        children[name] = processes.add(start_volunteer(homes[name], url, "--max-experts", count,
                                                       "--rebalance-period", period, name=name))
        uids[name] = set(serving_event(children[name])["uids"])

    # the grid fills before anything is replicated: 3 + 3 distinct, then the last 2 and one replica
    assert not uids["v1"] & uids["v2"]
    assert uids["v1"] | uids["v2"] | uids["v3"] == grid
    replica = uids["v3"] & (uids["v1"] | uids["v2"])
    assert len(replica) == 1

    # the volunteer that does not share v3's replica leaves: its 3 uids lose their only server
    leaver = "v2" if replica <= uids["v1"] else "v1"
    assert cli(homes[leaver], "stop").returncode == 0

    # v3 moves its replica to one of them (a restart that keeps its other experts' checkpoints) ...
    moved = children["v3"].wait_for_line(r'^\{"event": "rebalancing"', timeout=120)
    assert moved
    again = serving_event(children["v3"])
    new = set(again["uids"])
    assert replica.isdisjoint(new) and len(new & uids[leaver]) == 1
    assert (uids["v3"] - replica) <= set(again["restored"]), "kept experts come back from their checkpoints"

    # ... and a newcomer takes the two left, so the whole grid is served again
    children["v4"] = processes.add(start_volunteer(homes["v4"], url, "--max-experts", "2", "--rebalance-period", "0",
                                                   name="v4"))
    assert set(serving_event(children["v4"])["uids"]) == uids[leaver] - new

    def covered():
        counts = swarm.count_servers(client, experiment.manifest.dht_prefix, sorted(grid))
        return all(counts[uid] >= 1 for uid in grid)
    wait_for(covered, 60, "every uid of the grid to have a server")
