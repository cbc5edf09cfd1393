"""A seed, a trainer and N volunteers on 127.0.0.1: trainer steps/s and expert lookup latency as N grows.

For each N (1, 2, 4 by default: each volunteer is ~10 processes and 0.5-1 GiB, and they all share the
machine's cores with the trainer) a fresh swarm: the bootstrap peer (the seed's DHT role) in this
process, N ``volunteer start`` processes one after another, each ``--max-experts 8/N`` so that together
they serve the layer's 8 experts once, then

- expert lookup latency: ``hivemind.moe.get_experts`` of all 8 uids from a separate, fresh client peer on
  the idle swarm: its first lookup (nothing cached), then ``--lookups`` more (hivemind's DHT caches the
  records it found, so these are mostly local);
- the trainer (``coordinator_seeds.trainer.train``, its own client DHT) for ``--steps`` steps of 16 x 64
  tokens through one MoE layer (k=2); steps/s counted by ``on_step`` after ``--warmup`` steps.

On one 2-core box more volunteers cannot add compute; this measures what spreading the experts over
more processes costs (or gains: more runtimes working in parallel), not what more machines would give.

    .venv/bin/python -m bench.swarm_scaling [--volunteers 1,2,4] [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import statistics
import threading
import time

import hivemind

from bench._common import (
    BenchExperiment,
    Swarm,
    bench_args,
    machine_line,
    print_key,
    print_table,
    wait_experts,
)
from coordinator_seeds.trainer import StepReport, TrainerSettings, train

GRID_EXPERTS = 8


def lookup_latency(dht: hivemind.DHT, uids: list[str], times: int) -> list[float]:
    latencies = []
    for _ in range(times):
        started = time.perf_counter()
        found = hivemind.moe.get_experts(dht, uids)
        latencies.append(time.perf_counter() - started)
        if any(e is None for e in found):
            raise RuntimeError(f"lookup missed {[u for u, e in zip(uids, found) if e is None]}")
    return latencies


def run_trainer(swarm: Swarm, steps: int, warmup: int, time_cap: float) -> tuple[float, float, int]:
    """Train ``steps`` steps (stopped early after ``time_cap`` s); returns (steps/s after warm-up, mean
    loss of the last 5 steps, skipped steps)."""
    stamps: list[float] = []
    stop = threading.Event()
    started = time.monotonic()

    def on_step(report: StepReport) -> None:
        stamps.append(time.monotonic())
        if time.monotonic() - started > time_cap:
            stop.set()

    settings = TrainerSettings(swarm.experiment.manifest(), tuple(swarm.initial_peers), steps=steps,
                               log_every=steps + 1, expert_wait=60.0)
    reports = train(settings, on_step=on_step, stop=stop)
    if len(stamps) <= warmup + 1:
        raise RuntimeError(f"the trainer made only {len(stamps)} steps in {time_cap:.0f} s")
    rate = (len(stamps) - 1 - warmup) / (stamps[-1] - stamps[warmup])
    last = [r.loss for r in reports[-5:] if not r.skipped]
    return rate, statistics.fmean(last) if last else float("nan"), sum(r.skipped for r in reports)


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--volunteers", default="1,2,4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lookups", type=int, default=10)
    parser.add_argument("--time-cap", type=float, default=60.0, help="seconds of training per N at most")
    args = parser.parse_args()
    exp = BenchExperiment()
    uids = exp.manifest().layers[0].uids()
    print(machine_line())
    print(f"expert: {exp.describe()}; trainer batch {exp.trainer_batch} x {exp.seq_len} tokens, k=2")

    rows, figures = [], {}
    for n in [int(v) for v in args.volunteers.split(",") if v]:
        with Swarm(exp, keep=args.keep) as swarm:
            started = time.monotonic()
            for i in range(n):
                swarm.wait_serving(swarm.start_volunteer(f"volunteer{i}", max_experts=GRID_EXPERTS // n))
            ready = time.monotonic() - started
            client = swarm.client()
            cold = lookup_latency(client, uids, 1)[0]  # a fresh peer: nothing cached yet
            wait_experts(client, uids)
            latencies = sorted(lookup_latency(client, uids, args.lookups))  # hivemind caches found records
            rate, loss, skipped = run_trainer(swarm, args.steps, args.warmup, args.time_cap)
            p90 = latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))]
            rows.append([n, GRID_EXPERTS // n, f"{ready:.1f}", f"{1000 * cold:.1f}",
                         f"{1000 * statistics.median(latencies):.1f}",
                         f"{1000 * p90:.1f}", f"{rate:.2f}", f"{rate * exp.trainer_batch * exp.seq_len:.0f}",
                         f"{loss:.2f}", skipped])
            figures[f"steps_per_s_n{n}"] = f"{rate:.2f}"
            figures[f"first_lookup_ms_n{n}"] = f"{1000 * cold:.1f}"
    print_table(f"trainer and lookups as volunteers are added ({args.steps} steps, {args.warmup} of warm-up; "
                f"{args.lookups} lookups of {len(uids)} uids)",
                ["volunteers", "experts each", "all serving after s", "first lookup ms", "lookup ms (median)",
                 "lookup ms (p90)",
                 "trainer steps/s", "tokens/s", "loss (last 5)", "skipped steps"], rows)
    base = rows[0][0]
    for n in [r[0] for r in rows[1:]]:
        figures[f"steps_ratio_n{n}_over_n{base}"] = (
            f"{float(figures[f'steps_per_s_n{n}']) / float(figures[f'steps_per_s_n{base}']):.2f}")
    print_key("swarm_scaling", figures)


if __name__ == "__main__":
    main()
