"""The same expert served by ``volunteer start`` and by a plain ``hivemind.moe.Server``, same client.

A third server is the volunteer on hivemind's serving path (``--serving hivemind``, as it served before
the lean path): "before" in the tables.

Both servers run at once, each in its own process tree, each serving one uid of the same layer (same
expert type, same initial weights): the volunteer with ``--max-experts 1``, the plain server
(``bench/plain_server.py``) built from hivemind's ``ModuleBackend`` with the volunteer's settings
(2 connection handlers, the same max batch size, Adam with the same rate, announce every 20 s). One plain
hivemind client drives them in alternating rounds (volunteer, plain, volunteer, plain, ...), so the
load of the shared machine hits both alike, and the ratio is paired round by round. Before that, the
idle CPU of both trees over the same few seconds (nobody calling), and with each round the CPU time of
each server's process tree per call: steadier than throughput on a shared box.

With ``--lean-before TREE`` (a source tree of an earlier commit, e.g. ``git archive <commit> | tar -x -C
TREE``) a fourth server runs that tree's volunteer on the lean path, in the same alternating rounds:
the lean path before and after a change, side by side.

    .venv/bin/python -m bench.client_vs_hivemind [--seconds 2.5] [--rounds 6] [--threads 4] [--lean-before TREE] [--profile]
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

from bench._common import (
    BenchExperiment,
    CpuMeter,
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


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], seconds=2.5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=4, help="client threads (4 saturate one server here)")
    parser.add_argument("--batches", default="", help="comma-separated batch sizes (default: planned/4, planned)")
    parser.add_argument("--idle-seconds", type=float, default=6.0)
    parser.add_argument("--profile", action="store_true", help="py-spy both servers under load afterwards")
    parser.add_argument("--lean-before", type=Path, help="source tree of an earlier commit: its lean volunteer too")
    args = parser.parse_args()
    exp = BenchExperiment()
    print(machine_line())
    print(f"expert: {exp.describe()}; {args.threads} client threads")

    with Swarm(exp, keep=args.keep) as swarm:
        volunteer = swarm.wait_serving(swarm.start_volunteer("volunteer", max_experts=1))
        # the volunteer as it served before the lean path: hivemind's Server inside (serving = "hivemind")
        before = swarm.wait_serving(swarm.start_volunteer("volunteer-hivemind", "--serving", "hivemind",
                                                          max_experts=1))
        planned = volunteer.planned_batch(exp.max_batch_size)
        free = [uid for uid in exp.manifest().all_uids() if uid not in volunteer.uids + before.uids]
        plain = swarm.wait_serving(swarm.start_plain_server("plain", [free[0]], planned))
        client = swarm.client()
        servers = {"volunteer": volunteer, "plain": plain, "before": before}
        if args.lean_before is not None:
            servers["lean_before"] = swarm.wait_serving(swarm.start_volunteer(
                "volunteer-lean-before", max_experts=1, tree=args.lean_before.resolve()))
        experts = dict(zip(servers, wait_experts(client, [s.uids[0] for s in servers.values()])))
        print(f"volunteer (lean) serves {volunteer.uids[0]} (ready after {volunteer.ready_after:.1f} s), plain "
              f"hivemind serves {plain.uids[0]} (ready after {plain.ready_after:.1f} s), the volunteer with "
              f"--serving hivemind serves {before.uids[0]}; max batch {planned}")

        batches = [int(b) for b in args.batches.split(",") if b] or [max(planned // 4, 1), planned]
        time.sleep(2.0)  # past start-up work
        with CpuMeter(**{name: s.child.proc.pid for name, s in servers.items()}) as idle:
            time.sleep(args.idle_seconds)  # nobody calls: what each costs the machine just by running
        idle_pct = {name: 100 * idle.used[name][0] / args.idle_seconds for name in servers}
        print(f"idle CPU over {args.idle_seconds:.0f} s (100 = one core): volunteer {idle_pct['volunteer']:.1f}%, "
              f"plain hivemind {idle_pct['plain']:.1f}%, volunteer --serving hivemind {idle_pct['before']:.1f}%")
        rows, figures = [], {f"idle_cpu_pct_{name}": f"{idle_pct[name]:.1f}" for name in servers}
        for batch in batches:
            runs = alternate({
                name: with_cpu(partial(measure, remote_step(experts[name], batch, exp.d_model), args.seconds,
                                       threads=args.threads), server=servers[name].child.proc.pid)
                for name in servers
            }, args.rounds)
            key = paired_ratio(runs["volunteer"], runs["plain"])
            cpu = {n: median(r.cpu_ms_per_call("server") for r in runs[n]) for n in servers}
            over_before = paired_ratio(runs["volunteer"], runs["before"])
            if "lean_before" in servers:
                figures[f"volunteer_over_lean_before_b{batch}"] = f"{paired_ratio(runs['volunteer'], runs['lean_before']):.3f}"
                figures[f"cpu_per_call_over_lean_before_b{batch}"] = f"{cpu['volunteer'] / cpu['lean_before']:.2f}"
                print(f"batch {batch}: lean now / lean before {paired_ratio(runs['volunteer'], runs['lean_before']):.3f} "
                      f"(per round {' '.join(f'{r.per_second / p.per_second:.2f}' for r, p in zip(runs['volunteer'], runs['lean_before']))}), "
                      f"samples/s {median(r.per_second for r in runs['lean_before']):.0f}, cpu ms/call {cpu['lean_before']:.1f}")
            rows.append([batch, *(median(r.per_second for r in runs[n]) for n in ("volunteer", "plain", "before")),
                         f"{key:.3f}",
                         " ".join(f"{r.per_second / p.per_second:.2f}" for r, p in zip(runs["volunteer"], runs["plain"])),
                         f"{over_before:.3f}", *(f"{cpu[n]:.1f}" for n in ("volunteer", "plain", "before")),
                         f"{cpu['volunteer'] / cpu['plain']:.2f}", f"{cpu['volunteer'] / cpu['before']:.2f}"])
            figures[f"volunteer_over_plain_b{batch}"] = f"{key:.3f}"
            figures[f"volunteer_over_before_b{batch}"] = f"{over_before:.3f}"
            figures[f"cpu_per_call_ratio_b{batch}"] = f"{cpu['volunteer'] / cpu['plain']:.2f}"
            figures[f"cpu_per_call_over_before_b{batch}"] = f"{cpu['volunteer'] / cpu['before']:.2f}"

        print_table(
            f"samples/s, forward+backward+Adam through RemoteExpert; median of {args.rounds} alternating rounds "
            f"of {args.seconds:.0f} s",
            ["batch", "volunteer", "plain hivemind", "vol. --serving hivemind", "volunteer/plain", "per round",
             "volunteer/before", "volunteer cpu ms/call", "plain cpu ms/call", "before cpu ms/call",
             "cpu vol/plain", "cpu vol/before"], rows)
        print("cpu ms/call: CPU time of the server's whole process tree (p2pd included) per forward+backward call")
        if args.profile:
            profile(swarm, servers, experts, exp, batches[-1], args.threads, args.seconds)
        print_key("client_vs_hivemind", figures)


def profile(swarm: Swarm, servers: dict, experts: dict, exp: BenchExperiment, batch: int, threads: int,
            seconds: float) -> None:
    """Each server under load, sampled by py-spy: the hottest functions, and the share of samples that are
    the volunteer's own work (see ``_volunteer_overhead``): what it adds to hivemind's server."""
    duration = max(int(seconds * 2), 6)
    for name, served in servers.items():
        out: dict[str, tuple] = {}
        raw = swarm.root / f"{name}.raw"
        sampler = threading.Thread(target=lambda pid=served.child.proc.pid, raw=raw, out=out: out.__setitem__(
            "top", py_spy_top(pid, duration, raw)))
        sampler.start()
        measure(remote_step(experts[name], batch, exp.d_model), duration + 2, threads=threads)
        sampler.join(timeout=duration + 90)
        _, functions = out.get("top", ([], []))
        ours = _volunteer_overhead(raw)
        print_table(f"py-spy, {name} server, batch {batch}: % of busy samples by function (self); "
                    f"{ours:.1f}% of samples are the volunteer's own work", ["function", "%"],
                    [[f, f"{v:.1f}"] for f, v in functions])


def _volunteer_overhead(raw) -> float:
    """Percent of samples in the volunteer's own work: frames from ``volunteer/`` (counting, locks, stats,
    checkpoints, announcing, the trio supervisor), minus the expert's compute (hivemind's
    ``ModuleBackend.forward/backward`` below ``CountingBackend``) and the frames every stack of the main
    process carries (``cli.py``, ``run_volunteer``). The plain server's ``volunteer/experts.py`` frames
    (the same expert module) do not count."""
    total = inside = 0
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        ours = any("volunteer/" in f and not any(x in f for x in ("cli.py", "experts.py", "run_volunteer"))
                   for f in frames)
        compute = any("ModuleBackend.forward" in f or "ModuleBackend.backward" in f for f in frames)
        inside += int(count) * (ours and not compute)
    return 100.0 * inside / total if total else float("nan")


if __name__ == "__main__":
    main()
