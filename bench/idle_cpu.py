"""Idle CPU of a volunteer serving 4 experts, nobody calling: the lean path and hivemind's side by side.

Two ``volunteer start --max-experts 4`` (headless), one with ``--serving lean`` (the default) and one with
``--serving hivemind``, both alive at once; after a warm-up (the first announcements and pollers settle)
the CPU of each process tree, p2pd apart, over the same window, in alternating windows so load drift
hits both. With ``--profile``, py-spy of the lean one while idle: what still wakes up. With ``--before
TREE`` (an earlier commit's source tree, ``git archive <commit> | tar -x -C TREE``) a third volunteer runs
that tree's lean path in the same windows: before and after a change, side by side.

    .venv/bin/python -m bench.idle_cpu [--seconds 20] [--rounds 3] [--before TREE] [--profile]
"""

from __future__ import annotations

import time
from pathlib import Path

from bench._common import (
    BenchExperiment,
    CpuMeter,
    Swarm,
    bench_args,
    machine_line,
    median,
    print_key,
    print_table,
    py_spy_top,
)

PATHS = ("lean", "hivemind")


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], seconds=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds after serving before measuring")
    parser.add_argument("--profile", action="store_true", help="py-spy the idle lean volunteer afterwards")
    parser.add_argument("--before", type=Path, help="source tree of an earlier commit: its lean volunteer too")
    args = parser.parse_args()
    exp = BenchExperiment()
    print(machine_line())
    print(f"expert: {exp.describe()}; 4 experts a volunteer")
    with Swarm(exp, keep=args.keep) as swarm:
        paths = PATHS + (("before",) if args.before else ())
        served = {path: swarm.wait_serving(swarm.start_volunteer(f"idle-{path}", "--serving", path, max_experts=4))
                  for path in PATHS}
        if args.before:
            served["before"] = swarm.wait_serving(swarm.start_volunteer(
                "idle-before", "--serving", "lean", max_experts=4, tree=args.before.resolve()))
        time.sleep(args.warmup)
        used = {path: [] for path in paths}
        for _ in range(args.rounds):
            with CpuMeter(**{path: s.child.proc.pid for path, s in served.items()}) as meter:
                time.sleep(args.seconds)
            for path in paths:
                total, p2pd = meter.used[path]
                used[path].append((100 * total / args.seconds, 100 * p2pd / args.seconds))
        rows = [[path, *(f"{t:.2f}" for t, _ in used[path]), f"{median(t for t, _ in used[path]):.2f}",
                 f"{median(p for _, p in used[path]):.2f}"] for path in paths]
        print_table(f"idle CPU, % of one core, {args.rounds} windows of {args.seconds:.0f} s (volunteer's process "
                    "tree: Python, DHT, p2pd)", ["serving", *(f"window {i + 1}" for i in range(args.rounds)),
                                                 "median", "of which p2pd"], rows)
        if args.profile:
            processes, functions = py_spy_top(served["lean"].child.proc.pid, args.seconds, swarm.root / "idle.raw")
            title = "py-spy, idle lean volunteer: % of busy samples"
            print_table(f"{title}, by process", ["process", "%"], [[p, f"{v:.1f}"] for p, v in processes])
            print_table(f"{title}, by function (self)", ["function", "%"], [[f, f"{v:.1f}"] for f, v in functions])
        print_key("idle_cpu", {f"{path}_pct": f"{median(t for t, _ in used[path]):.2f}" for path in paths})


if __name__ == "__main__":
    main()
