"""Forward+backward samples/s of one expert: plain local torch vs served by a real ``volunteer start``.

(a) local: the expert module in this process, ``y = f(x); y.backward(g); adam.step()`` per batch;
    also "as the server does it": a no-grad forward, then the backward call's recompute + backward + step.
(b) served: ``volunteer start --max-experts 1`` on 127.0.0.1, driven by a plain hivemind client
    (``hivemind.DHT(client_mode=True)`` + ``get_experts`` -> ``RemoteExpert``, forward and backward
    through autograd) from 1, 2 and 4 client threads: one thread leaves the server idle while a request
    travels, so the best of the three is what the server can do.

Local torch runs with torch's default intra-op threads and with 1 thread, and the better of the two
in each round is the baseline (on a busy 2-core box, 2 OpenMP threads can stall each other badly). Client and server share the machine's cores, as in every
loopback benchmark; the CPU columns say where the time went (CPU ms per forward+backward call of the
volunteer's process tree, of its p2pd, and of the client). A second volunteer with ``--cpu-threads 1``
(one torch thread in its Runtime) is measured alongside: does the default oversubscribe the cores? The rounds alternate (local, as-server,
served, local, ...) so that load drift hits every side; ratios are paired round by round.

    .venv/bin/python -m bench.served_vs_local [--seconds 2.5] [--rounds 3] [--sizes tiny,base] [--batches 256,1024] [--profile]
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from bench._common import (
    BenchExperiment,
    Rate,
    Swarm,
    alternate,
    bench_args,
    machine_line,
    measure,
    median,
    paired_ratio,
    print_key,
    print_table,
    py_spy_top,
    remote_step,
    wait_experts,
    with_cpu,
)
from volunteer.serving.experts import build_expert, build_optimizer

THREADS = (1, 2, 4)  # client threads driving the served expert
TORCH_THREADS = torch.get_num_threads()  # torch's default: one per core


def local_run(exp: BenchExperiment, batch: int, seconds: float, *, torch_threads: int, as_server: bool) -> Rate:
    """The expert in this process, with ``torch_threads`` intra-op threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        return measure(local_step(exp, batch, as_server=as_server), seconds)
    finally:
        torch.set_num_threads(before)


def local_step(exp: BenchExperiment, batch: int, *, as_server: bool) -> Callable[[], Callable[[], int]]:
    def make() -> Callable[[], int]:
        module = build_expert(exp.block, exp.d_model, exp.d_hidden, seed=0)
        optimizer = build_optimizer("adam", module.parameters(), lr=exp.lr)
        x = torch.randn(batch, exp.d_model, requires_grad=True)
        grad = torch.randn(batch, exp.d_model)

        def step() -> int:
            if as_server:  # the forward RPC, then the backward RPC recomputes (hivemind's ModuleBackend)
                with torch.no_grad():
                    module(x)
            module(x).backward(grad)
            optimizer.step()
            optimizer.zero_grad()
            return batch

        return step

    return make


# the expert sizes compared: the demo's tiny expert and the CPU-sized one of the shipped "base" experiment
SIZES = {
    "tiny": BenchExperiment(),
    "base": BenchExperiment(d_model=512, d_hidden=2048, lr=0.0003, uid_prefix="bench_base0"),
}


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], seconds=2.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="tiny,base", help=f"comma-separated expert sizes of {', '.join(SIZES)}")
    parser.add_argument("--batches", default="", help="comma-separated batch sizes (default: planned/4, planned)")
    parser.add_argument("--profile", action="store_true", help="py-spy the volunteer and the client once more")
    args = parser.parse_args()
    print(machine_line())
    figures = {}
    for size in args.sizes.split(","):
        figures.update({f"{size}_{k}": v for k, v in run_size(SIZES[size], args).items()})
    print_key("served_vs_local", figures)


def run_size(exp: BenchExperiment, args) -> dict[str, str]:
    """Every measurement of one expert size, in its own swarm; returns the KEY figures."""
    print(f"\nexpert: {exp.describe()}")
    with Swarm(exp, keep=args.keep) as swarm:
        served = swarm.wait_serving(swarm.start_volunteer("volunteer", max_experts=1))
        # the same, with one torch thread: is the default (all cores) oversubscribed?
        served1 = swarm.wait_serving(swarm.start_volunteer("volunteer-1thread", "--cpu-threads", "1", max_experts=1))
        planned = served.planned_batch(exp.max_batch_size)
        client = swarm.client()
        [expert, expert1] = wait_experts(client, [*served.uids, *served1.uids])
        batches = [int(b) for b in args.batches.split(",") if b] or sorted({max(planned // 4, 1), planned})
        print(f"volunteer serves {served.uids[0]} (ready {served.ready_after:.1f} s after start), "
              f"planned max batch {planned}; the trainer's calls carry about planned/4 samples "
              f"(16 x 64 tokens x k=2 over 8 experts)")

        rows, scans, figures = [], [], {"planned_batch": str(planned)}
        pids = {"server": served.child.proc.pid, "everything": os.getpid()}
        for batch in batches:
            remote = remote_step(expert, batch, exp.d_model)
            # which client concurrency saturates the server: one thread leaves it idle while requests travel
            scan = {t: measure(remote, args.seconds / 2, threads=t).per_second for t in THREADS}
            best = max(scan, key=scan.get)
            scans.append([batch, *scan.values(), best])
            runs = alternate({
                "local": partial(local_run, exp, batch, args.seconds, torch_threads=TORCH_THREADS, as_server=False),
                "local1": partial(local_run, exp, batch, args.seconds, torch_threads=1, as_server=False),
                "as_server": partial(local_run, exp, batch, args.seconds, torch_threads=1, as_server=True),
                "served": with_cpu(partial(measure, remote, args.seconds, threads=best), **pids),
                "served1": partial(measure, remote_step(expert1, batch, exp.d_model), args.seconds, threads=best),
            }, args.rounds)
            # local torch at its best in each round: on a busy 2-core box 2 OpenMP threads can stall each other
            runs["best_local"] = [max(a, b, key=lambda r: r.per_second) for a, b in zip(runs["local"], runs["local1"])]
            served_rates = runs["served"]
            server_ms = median(r.cpu_ms_per_call("server") for r in served_rates)
            server_p2pd = median(r.cpu_ms_per_call("server", p2pd=True) for r in served_rates)
            client_ms = median((r.cpu["everything"][0] - r.cpu["server"][0]) * 1000 / r.calls for r in served_rates)
            local_ms = median(1000 * r.seconds / r.calls for r in runs["best_local"])
            key = paired_ratio(served_rates, runs["best_local"])
            rows.append([batch, *(median(r.per_second for r in runs[n]) for n in ("local", "local1", "as_server")),
                         median(r.per_second for r in served_rates), f"{key:.2f}",
                         f"{paired_ratio(served_rates, runs['as_server']):.2f}",
                         median(r.per_second for r in runs["served1"]), f"{paired_ratio(runs['served1'], served_rates):.2f}",
                         f"{local_ms:.2f}", f"{server_ms:.1f}", f"{server_p2pd:.1f}", f"{client_ms:.1f}"])
            figures[f"served_over_local_b{batch}"] = f"{key:.2f}"
            figures[f"omp1_over_default_b{batch}"] = f"{paired_ratio(runs['served1'], served_rates):.2f}"

        print_table(f"scan, {args.seconds / 2:.1f} s each: served samples/s by client threads",
                    ["batch", *(f"{t} thr" for t in THREADS), "best"], scans)
        print_table(
            f"samples/s, forward+backward+Adam; served with the best client threads; median of {args.rounds} "
            f"alternating rounds of {args.seconds:.0f} s; ratios paired round by round",
            ["batch", f"local {TORCH_THREADS} thr", "local 1 thr", "as server 1 thr", "served", "served/local",
             "served/as-server", "served 1-thr vol", "1-thr/default",
             "local ms/call", "server cpu ms/call", "of which p2pd", "client cpu ms/call"],
            rows,
        )
        print("served/local is paired with the better local run of each round; local ms/call is its wall time; cpu ms/call is from /proc over the served "
              "rounds: the volunteer's process tree (runtime, pools, handlers, DHT, p2pd) and this client")
        if args.profile:
            best = scans[-1][-1]
            profile(swarm, served, expert, exp, batches[-1], best, args.seconds)
        return figures


def profile(swarm: Swarm, served, expert, exp: BenchExperiment, batch: int, threads: int, seconds: float) -> None:
    """One more served round at the planned batch, sampled by py-spy: where do the volunteer and the
    client spend their time? (self time of the hottest Python functions, all processes of each tree)"""
    duration = max(int(seconds * 2), 6)
    out: dict[str, tuple] = {}

    def sample(name: str, pid: int, subprocesses: bool) -> None:
        out[name] = py_spy_top(pid, duration, swarm.root / f"{name}.raw", subprocesses=subprocesses)

    samplers = [threading.Thread(target=sample, args=("volunteer", served.child.proc.pid, True)),
                threading.Thread(target=sample, args=("client", os.getpid(), False))]
    for s in samplers:
        s.start()
    measure(remote_step(expert, batch, exp.d_model), duration + 2, threads=threads)
    for s in samplers:
        s.join(timeout=duration + 90)
    for name, (processes, functions) in out.items():
        title = f"py-spy, {name}, batch {batch}, {threads} client threads: % of busy samples"
        print_table(f"{title}, by process", ["process", "%"], [[p, f"{v:.1f}"] for p, v in processes])
        print_table(f"{title}, by function (self)", ["function", "%"], [[f, f"{v:.1f}"] for f, v in functions])
    print(f"raw stacks: {Path(swarm.root)} (pass --keep to keep them)")


if __name__ == "__main__":
    main()
