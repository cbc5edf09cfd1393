"""What the live stats and the dashboard cost a volunteer (row 4 of issue 5).

Three ``volunteer start --max-experts 1`` processes serve one uid each of the same layer, side by side:
  headless   the default when stdout is not a terminal: counters, samplers (1 s), telemetry (2 s), swarm
             poller (10 s) and a JSON stats line every 10 s
  dashboard  ``--dashboard``: the same collectors plus rich's full-screen dashboard redrawn every second
             (into a pipe here, so the terminal's own cost is not counted)
  no-stats   ``--no-stats``
Measured: (1) idle CPU of each process tree over the same window, nobody calling; (2) forward+backward
samples/s through a plain hivemind client (``--threads`` client threads, batch = the planned max / 4,
what the trainer sends), in alternating rounds, and CPU ms per call of each tree; (3) in this process,
one real snapshot fetched over the control socket (what ``volunteer status`` does), then the cost of
``StatsSnapshot.from_dict``, of rendering the dashboard frame (``dashboard.render`` into a 120 x 40
console in memory) and of the JSON stats line.

If ``volunteer/dashboard.py`` is missing it prints ``pending: dashboard not built yet`` and exits 0.

    .venv/bin/python -m bench.dashboard_cost [--seconds 2] [--rounds 5] [--idle-seconds 10]
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from bench._common import (
    REPO,
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
    remote_step,
    wait_experts,
    with_cpu,
)

VARIANTS = {"headless": (), "dashboard": ("--dashboard",), "no-stats": ("--no-stats",)}


def render_costs(home: Path, frames: int = 30) -> list[tuple[str, float]]:
    """Milliseconds per operation on one real snapshot of the volunteer living in ``home``."""
    from rich.console import Console

    from volunteer.node import control
    from volunteer.node.stats import StatsSnapshot
    from volunteer.views.dashboard import render

    path = control.socket_path(home / "runtime")
    rows = []
    started = time.perf_counter()
    for _ in range(frames):
        answer = control.request(path, "status")
    rows.append(("control socket 'status' round trip (volunteer status)", (time.perf_counter() - started) / frames))
    data = answer["status"]
    started = time.perf_counter()
    for _ in range(frames):
        snapshot = StatsSnapshot.from_dict(data)
    rows.append(("StatsSnapshot.from_dict", (time.perf_counter() - started) / frames))
    console = Console(file=io.StringIO(), width=120, height=40, force_terminal=True, color_system="truecolor")
    started = time.perf_counter()
    for _ in range(frames):
        console.print(render(snapshot))
    rows.append(("dashboard frame, 120 x 40 (render + rich layout)", (time.perf_counter() - started) / frames))
    started = time.perf_counter()
    for _ in range(frames):
        json.dumps(snapshot.to_dict())
    rows.append(("JSON stats line (snapshot.to_dict + dumps)", (time.perf_counter() - started) / frames))
    return [(name, 1000 * seconds) for name, seconds in rows]


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], seconds=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    if not (REPO / "volunteer" / "dashboard.py").exists():
        print("pending: dashboard not built yet")
        return
    exp = BenchExperiment()
    print(machine_line())
    print(f"expert: {exp.describe()}; {args.threads} client threads")

    with Swarm(exp, keep=args.keep) as swarm:
        served = {}
        for name, flags in VARIANTS.items():  # one after another: each takes a uid nobody serves yet
            served[name] = swarm.wait_serving(swarm.start_volunteer(name, *flags, max_experts=1))
        client = swarm.client()
        experts = dict(zip(served, wait_experts(client, [s.uids[0] for s in served.values()])))
        batch = max(served["headless"].planned_batch(exp.max_batch_size) // 4, 1)
        pids = {name: s.child.proc.pid for name, s in served.items()}

        time.sleep(2.0)  # past start-up work (first telemetry, swarm poll)
        with CpuMeter(**{n.replace("-", "_"): pid for n, pid in pids.items()}) as idle:
            time.sleep(args.idle_seconds)
        idle_cpu = {n: 100 * idle.used[n.replace("-", "_")][0] / args.idle_seconds for n in served}

        runs = alternate({
            name: with_cpu(lambda name=name: measure(remote_step(experts[name], batch, exp.d_model), args.seconds,
                                                     threads=args.threads), tree=pids[name])
            for name in served
        }, args.rounds)
        rows = [[name, f"{idle_cpu[name]:.1f}", median(r.per_second for r in runs[name]),
                 f"{paired_ratio(runs[name], runs['headless']):.3f}", f"{median(r.cpu_ms_per_call('tree') for r in runs[name]):.1f}"]
                for name in served]
        print_table(f"idle CPU over {args.idle_seconds:.0f} s (100 = one core), and serving at batch {batch}: median "
                    f"of {args.rounds} alternating rounds of {args.seconds:.0f} s",
                    ["volunteer", "idle cpu %", "samples/s", "vs headless", "cpu ms/call"], rows)

        costs = render_costs(served["headless"].home)
        print_table("in this process, on one real snapshot", ["operation", "ms"],
                    [[name, f"{ms:.2f}"] for name, ms in costs])
        frame_ms = dict(costs)["dashboard frame, 120 x 40 (render + rich layout)"]
        print_key("dashboard_cost", {
            "idle_cpu_pct_headless": f"{idle_cpu['headless']:.1f}", "idle_cpu_pct_dashboard": f"{idle_cpu['dashboard']:.1f}",
            "idle_cpu_pct_nostats": f"{idle_cpu['no-stats']:.1f}",
            "dashboard_over_headless": f"{paired_ratio(runs['dashboard'], runs['headless']):.3f}",
            "nostats_over_headless": f"{paired_ratio(runs['no-stats'], runs['headless']):.3f}",
            "frame_ms": f"{frame_ms:.1f}",
        })


if __name__ == "__main__":
    main()
