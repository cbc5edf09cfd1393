"""Scale (issue 13): N real DHT peers over a grid of 4,096 uids, N = 8, 16, 32, 64, plus real volunteers.

One swarm grows in steps. Each lightweight peer is a full ``hivemind.DHT`` (its own process and p2pd,
the experiment's validators, not client mode: a volunteer's DHT role) that behaves as a volunteer
does, through the project's own code and nothing else:

- at join: reads the swarm (``swarm.count_servers``: the volunteers key and the grid's prefix records,
  ``GridCoverage``), picks ``--uids-per-peer`` uids least served first (ties by a hash of its peer id, as
  ``choice.plan_experts`` breaks them), declares them with hivemind's ``declare_experts`` and publishes
  its signed volunteer record;
- every period (``--period``, scaled down from the real 10 s swarm poll and 30 s announce so a window
  of a minute or two holds several): re-declares, re-publishes, reads the swarm view again.

Measured at each N: join time (spawn of the DHT to its first swarm read), coverage (distinct uids
served, duplicates: every uid should be served once before any twice), lookup latency from a fresh
client (``dht_calls.get_experts`` of one served uid with the newest record, and the trainer's row
lookup ``active_successors``), and the DHT RPCs each peer sends per minute (find, store, ping), counted
inside every DHT process by wrapping its ``DHTProtocol.call_*`` methods (observation only). At the
largest N, ``--volunteers`` real ``volunteer start`` processes join the same grid.

    .venv/bin/python -m bench.scale [--steps 8,16,32,64] [--period 5] [--window 60] [--volunteers 2]
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import hivemind
import psutil
from hivemind.moe.server.dht_handler import declare_experts
from hivemind.utils import get_dht_time

from bench._common import (
    BenchExperiment,
    Swarm,
    bench_args,
    machine_line,
    print_key,
    print_table,
)
from volunteer.core import dht_calls, records
from volunteer.node import swarm as volunteer_swarm

CALLS = ("call_find", "call_store", "call_ping")
RECORD_TTL = 900.0


async def _install_counter(_dht: hivemind.DHT, node: Any) -> None:
    """Runs in the DHT process: count the RPCs this peer sends."""
    protocol, counts = node.protocol, dict.fromkeys(CALLS, 0)
    for name in CALLS:
        original = getattr(protocol, name)

        async def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            counts[_name] += 1
            return await _original(*args, **kwargs)

        setattr(protocol, name, counted)
    node.bench_counts = counts


async def _read_counter(_dht: hivemind.DHT, node: Any) -> dict[str, int]:
    return dict(node.bench_counts)


class Peer:
    """A lightweight volunteer: a DHT peer that declares a few uids and reads the swarm as a volunteer."""

    def __init__(self, bench: Swarm, uids: list[str], per_peer: int):
        started = time.monotonic()
        manifest = bench.experiment.manifest()
        self.prefix, self.all_uids, self.per_peer = manifest.dht_prefix, uids, per_peer
        self.dht = bench._track(records.join_dht(self.prefix, bench.initial_peers, host="127.0.0.1"))
        self.dht.run_coroutine(_install_counter)
        self.peer_id = self.dht.peer_id.to_base58()
        self.coverage = volunteer_swarm.GridCoverage(uids)
        self.served = self.choose()
        self.join_seconds = time.monotonic() - started
        self.announce()

    def read(self) -> dict[str, int]:
        return dict(volunteer_swarm.count_servers(self.dht, self.prefix, self.all_uids, coverage=self.coverage))

    def choose(self) -> list[str]:
        self.coverage.read(self.dht, rows_per_read=dht_calls.MAX_KEYS_PER_CALL)  # as a node's start does
        counts = self.read()
        tie = {uid: hashlib.sha256(f"{self.peer_id}{uid}".encode()).digest() for uid in self.all_uids}
        return sorted(self.all_uids, key=lambda uid: (counts[uid], tie[uid]))[: self.per_peer]

    def announce(self) -> None:
        # records outlive the joins of a whole step (no tick runs while peers join): as if announced on time
        until = get_dht_time() + RECORD_TTL
        declare_experts(self.dht, self.served, expiration_time=until)
        dht_calls.declare_grid_roots(self.dht, self.served, until)  # as node.announce does
        record = records.VolunteerRecord(self.peer_id, tuple(self.served), "cpu", 100.0)
        records.publish_volunteer(self.dht, self.prefix, record, ttl=RECORD_TTL)

    def tick(self) -> None:
        self.announce()
        records.read_trainer_progress(self.dht, self.prefix)
        self.read()

    def sent(self) -> dict[str, int]:
        return self.dht.run_coroutine(_read_counter)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def lookup_latency(bench: Swarm, served: list[str], lookups: int) -> tuple[list[float], list[float], int]:
    client = records.join_dht(bench.experiment.manifest().dht_prefix, bench.initial_peers, client_mode=True)
    try:
        one, row, missing = [], [], 0
        for uid in random.Random(0).choices(served, k=lookups):
            started = time.perf_counter()
            [expert] = dht_calls.get_experts(client, [uid])
            one.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            dht_calls.active_successors(client, [dht_calls.parent_prefix(uid)])
            row.append((time.perf_counter() - started) * 1000)
            missing += expert is None
        return one, row, missing
    finally:
        bench.drop(client) if client in bench.dhts else client.shutdown()


def run_window(peers: list[Peer], period: float, window: float) -> dict[str, float]:
    """Every peer does its periodic work for ``window`` seconds; returns RPCs sent per peer per minute,
    by kind and in all."""
    before = [p.sent() for p in peers]
    started, ticks = time.monotonic(), 0
    with ThreadPoolExecutor(8) as pool:
        while time.monotonic() - started < window:
            ticks += 1
            tick_start = time.monotonic()
            list(pool.map(lambda p: p.tick(), peers))
            time.sleep(max(0.0, period - (time.monotonic() - tick_start)))
    minutes = (time.monotonic() - started) / 60
    after = [p.sent() for p in peers]
    rates = {c: sum(a[c] - b[c] for a, b in zip(after, before)) / len(peers) / minutes for c in CALLS}
    return {**rates, "all": sum(rates.values()), "ticks_per_min": ticks / minutes,
            "per_tick": sum(rates.values()) * minutes / ticks}


def main() -> None:
    parser = bench_args(__doc__.split("\n")[0])
    parser.add_argument("--steps", default="8,16,32,64", help="swarm sizes to measure at")
    parser.add_argument("--grid", default="64,64", help="the layer's grid")
    parser.add_argument("--uids-per-peer", type=int, default=4)
    parser.add_argument("--period", type=float, default=5.0, help="seconds between a peer's announce + read")
    parser.add_argument("--window", type=float, default=45.0, help="seconds of periodic work measured per step")
    parser.add_argument("--lookups", type=int, default=30)
    parser.add_argument("--volunteers", type=int, default=2, help="real `volunteer start`s at the largest step")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    experiment = BenchExperiment(grid=tuple(int(g) for g in args.grid.split(",")), uid_prefix="scale_ffn0")
    uids = experiment.manifest().all_uids()
    print(machine_line())
    print(f"grid {list(experiment.grid)} = {len(uids)} uids, {args.uids_per_peer} uids a peer, period "
          f"{args.period:.0f} s, window {args.window:.0f} s")
    rows, key = [], {}
    with Swarm(experiment, keep=args.keep) as bench:
        peers: list[Peer] = []
        for n in steps:
            stop_reason = None
            while len(peers) < n:
                available = psutil.virtual_memory().available
                if available < 2 * 2**30:
                    stop_reason = f"stopped at {len(peers)} peers: {available / 2**30:.1f} GiB RAM left"
                    break
                peers.append(Peer(bench, uids, args.uids_per_peer))
            if stop_reason:
                print(stop_reason)
                break
            joins = [p.join_seconds for p in peers]
            served = [uid for p in peers for uid in p.served]
            seen = set(volunteer_swarm.GridCoverage(uids, rows_per_read=256).read(peers[0].dht))
            one, row, missing = lookup_latency(bench, served, args.lookups)
            rate = run_window(peers, args.period, args.window)
            rows.append([n, f"{statistics.median(joins):.1f} / {max(joins):.1f}",
                         f"{percentile(one, .5):.0f} / {percentile(one, .95):.0f}",
                         f"{percentile(row, .5):.0f} / {percentile(row, .95):.0f}",
                         f"{len(set(served))}/{len(served)}", len(seen & set(served)), missing,
                         f"{rate['all']:.0f}", " / ".join(f"{rate[c]:.0f}" for c in CALLS),
                         f"{rate['ticks_per_min']:.1f}", f"{rate['per_tick']:.0f}"])
            key[f"rpc_per_peer_tick_{n}"] = round(rate["per_tick"])
            key[f"rpc_per_peer_min_{n}"] = round(rate["all"])
            key[f"lookup_p95_ms_{n}"] = round(percentile(one, .95))
            print_table("so far", ["peers", "join s (p50 / max)", "get_experts ms p50 / p95",
                                   "row lookup ms p50 / p95", "distinct / served", "seen in prefix records",
                                   "lookups not found", "RPCs per peer per min", "find / store / ping",
                                   "ticks per min", "RPCs per peer per tick"], rows)
        if args.volunteers and peers:
            children = [bench.start_volunteer(f"v{i}", max_experts=2) for i in range(args.volunteers)]
            served_by = {p.peer_id: set(p.served) for p in peers}
            starts = []
            for child in children:
                info = bench.wait_serving(child, timeout=240)
                starts.append(info.ready_after)
                clash = [uid for uid in info.uids if any(uid in s for s in served_by.values())]
                served_by[info.peer_id] = set(info.uids)
                print(f"real volunteer {child.name}: serving {len(info.uids)} uids after {info.ready_after:.1f} s, "
                      f"{len(clash)} already served by another peer")
            key["volunteer_start_s_max"] = round(max(starts), 1)
        pss = sum(psutil.Process(d.pid).memory_full_info().pss for d in bench.dhts if d.is_alive()) / 2**20
        p2pd = sum(c.memory_full_info().pss for d in bench.dhts if d.is_alive()
                   for c in psutil.Process(d.pid).children() if "p2pd" in c.name()) / 2**20
        key["dht_pss_mib_total"], key["p2pd_pss_mib_total"] = round(pss), round(p2pd)
        print(f"\n{len(bench.dhts)} DHT processes hold {pss:.0f} MiB PSS, their p2pd daemons {p2pd:.0f} MiB")
    print_key("scale", key)


if __name__ == "__main__":
    main()
