"""Kept forwards on vs off (hivemind's recompute), same lean server, same client, alternating rounds.

One ``LeanServer`` in this process serves one expert of the bench experiment's size; a plain hivemind
client (``RemoteExpert``, forward and autograd backward) drives it from 1 and 4 threads. Each round
measures it twice: with the backend's kept forwards (``serving.activations``, the default) and with
them switched off (``backend.kept = None``: hivemind's ``ModuleBackend`` forward without autograd and
a backward that recomputes the forward). Besides samples/s it reads the CPU time of the server's own
threads (the RPC loop and the device worker, from ``/proc/self/task``): the client's share of this
process and both p2p daemons are left out, so the CPU figure is the serving path's alone.

    .venv/bin/python -m bench.kept_forwards [--sizes tiny,base] [--batches 256,1024] [--threads 1,4] [--rounds 5] [--seconds 2]
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import torch

from bench._common import (
    Rate,
    bench_args,
    machine_line,
    measure,
    median,
    print_key,
    print_table,
    remote_step,
)
from bench.served_vs_local import SIZES
from coordinator_seeds.dispatch import shutdown_dht
from volunteer.core import records
from volunteer.serving.backends import build_backends
from volunteer.serving.checkpoints import CheckpointStore
from volunteer.serving.handler import LeanServer

SERVER_THREADS = ("expert-rpc-loop", "expert-worker-")


def server_cpu_seconds() -> float:
    """CPU seconds so far of this process's serving threads (by name), from /proc/self/task."""
    ids = {t.native_id for t in threading.enumerate() if t.name.startswith(SERVER_THREADS)}
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in ids:
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def measured(backend, kept, expert, batch: int, d_model: int, seconds: float, threads: int) -> tuple[Rate, float]:
    """One run with ``kept`` (a KeptForwards, or None for hivemind's recompute): rate, server CPU ms a call."""
    backend.kept = kept
    before = server_cpu_seconds()
    rate = measure(remote_step(expert, batch, d_model), seconds, threads=threads)
    return rate, 1000 * (server_cpu_seconds() - before) / max(rate.calls, 1)


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], seconds=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="tiny,base")
    parser.add_argument("--batches", default="256,1024")
    parser.add_argument("--threads", default="1,4", help="client threads (comma-separated)")
    args = parser.parse_args()
    print(machine_line())
    rows, figures = [], {}
    for size in args.sizes.split(","):
        exp = SIZES[size]
        manifest = exp.manifest()
        uids = manifest.all_uids()[:1]
        store = CheckpointStore(Path(tempfile.mkdtemp(prefix="bench-kept-")))
        backends, _ = build_backends(manifest, uids, exp.max_batch_size, store, pools=False)
        backend = backends[uids[0]]
        kept = backend.kept
        dht = records.join_dht(manifest.dht_prefix)
        server = LeanServer(dht, backends, [("cpu", uids)], update_period=30)
        client = None
        try:
            server.run_in_background(timeout=60)
            client = records.join_dht(manifest.dht_prefix, [str(m) for m in dht.get_visible_maddrs()],
                                      client_mode=True)
            from hivemind.moe import get_experts

            [expert] = get_experts(client, uids)
            for threads in (int(t) for t in args.threads.split(",")):
                for batch in (int(b) for b in args.batches.split(",")):
                    for mode in (kept, None):  # untimed: first calls of each mode, allocator warm-up
                        measured(backend, mode, expert, batch, exp.d_model, args.seconds / 2, threads)
                    hits, misses = kept.hits, kept.misses
                    on, off, failed = [], [], 0
                    for _ in range(args.rounds):
                        try:  # a failed call fails its round pair, named in the table, not the whole run
                            pair = [measured(backend, mode, expert, batch, exp.d_model, args.seconds, threads)
                                    for mode in (kept, None)]
                        except Exception as e:
                            failed += 1
                            print(f"{size} batch {batch} threads {threads}: a round failed: {type(e).__name__}: {e}")
                            continue
                        on.append(pair[0])
                        off.append(pair[1])
                    if not on:
                        continue
                    ratios = sorted(a.per_second / b.per_second for (a, _), (b, _) in zip(on, off))
                    cpu_on, cpu_off = median(c for _, c in on), median(c for _, c in off)
                    rows.append([size, batch, threads, median(r.per_second for r, _ in on),
                                 median(r.per_second for r, _ in off), f"{median(ratios):.2f}",
                                 f"{ratios[0]:.2f}-{ratios[-1]:.2f}", f"{cpu_on:.2f}", f"{cpu_off:.2f}",
                                 f"{cpu_on / cpu_off:.2f}", kept.hits - hits, kept.misses - misses, failed])
                    figures[f"{size}_b{batch}_t{threads}"] = f"{median(ratios):.2f}"
                    figures[f"{size}_b{batch}_t{threads}_cpu"] = f"{cpu_on / cpu_off:.2f}"
        finally:
            backend.kept = kept
            server.shutdown()
            server.join(10)
            if client is not None:
                shutdown_dht(client)
    print_table(f"samples/s through RemoteExpert (forward + backward + Adam), kept forwards on / off; "
                f"median of {args.rounds} alternating rounds of {args.seconds:.0f} s; server threads' CPU per call; "
                f"torch threads {torch.get_num_threads()} (client and server share them)",
                ["size", "batch", "client thr", "kept", "recompute", "kept/recompute", "min-max",
                 "cpu ms kept", "cpu ms recompute", "cpu kept/recompute", "hits", "misses", "failed rounds"], rows)
    print_key("kept_forwards", figures)


if __name__ == "__main__":
    main()
