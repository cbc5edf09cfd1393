"""Off loopback, in the network lab (tests/netlab.py; root and ``ip netns`` needed): trainer steps/s and
tokens/s with the trainer and its volunteer 0 / 40 / 100 ms apart (one way), one synchronous step at a
time (``--in-flight 1``, before issue 12's item 4) and with several micro-batches in flight (after),
and served samples/s of the same volunteer reached directly (public address) and from behind a home
router with no port forward (it dials the trainer, which calls back over that connection).

One lab per delay: a seed and a trainer on public hosts; at 0 ms a volunteer on a public host first,
then (at every delay) one behind a home router, each serving the lab experiment's 4 experts (d_model
256: 512 KiB a call each way). Against each volunteer the trainer runs once per in-flight setting,
alternated; once a logged step saw all 4 experts alive and ``--warmup`` steps later, the next
``--steps`` are timed from its log; the volunteer's own counters give samples/s over the same window.
Ends with one ``KEY wan_lab ...`` line.

    .venv/bin/python -m bench.wan_lab [--steps 20] [--delays 0,40,100] [--in-flight 1,4]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.netlab import Link, NetLab

LOG_EVERY = 5  # the trainer logs (and publishes to the DHT) every this many steps; timing reads its log
ALL_ALIVE = r"step (\d+) loss \S+, experts alive 4 of 4"


def served(home: Path) -> int:
    from tests.test_netlab import _status

    session = _status(home).get("session", {})
    return session.get("forward_samples", 0) + session.get("backward_samples", 0)


def time_trainer(lab, volunteer_home: Path, in_flight: int, warmup: int, steps: int) -> dict:
    """One trainer run against the volunteer serving from ``volunteer_home``: steps/s over ``steps``
    steps after the first logged step with every expert alive and ``warmup`` more."""
    home = Path(tempfile.mkdtemp(prefix="wanb-"))
    trainer = lab.trainer(home, 100000, LOG_EVERY, "--in-flight", str(in_flight))
    try:
        first = int(trainer.wait_for_line(ALL_ALIVE, timeout=300)[1])
        trainer.wait_for_line(rf"step {first + warmup} ", timeout=300)
        started, samples = time.monotonic(), served(volunteer_home)
        last = trainer.wait_for_line(rf"step {first + warmup + steps} loss \S+, experts alive (\d+)", timeout=600)
        seconds = time.monotonic() - started
        done = served(volunteer_home) - samples
        return dict(steps_per_s=steps / seconds, samples_per_s=done / seconds, alive=int(last[1]), first=first)
    finally:
        trainer.stop()
        shutil.rmtree(home, ignore_errors=True)


def run_lab(delay_ms: float, in_flights: list[int], warmup: int, steps: int, tokens_per_step: int) -> list[dict]:
    from tests.test_netlab import Lab

    link = Link(delay=delay_ms / 2000)  # two cables between any two hosts: each takes half
    root = Path(tempfile.mkdtemp(prefix="wanb-"))
    lab = Lab(root, link=link, cloud=delay_ms == 0)
    rows = []
    try:
        places = [("direct", lab.cloud)] if delay_ms == 0 else []
        for reach, host in [*places, ("outbound", lab.pc)]:
            home = Path(tempfile.mkdtemp(prefix="wanb-"))
            volunteer = lab.volunteer(home, on=host)
            try:
                volunteer.wait_for_line(r'"event": "serving"', timeout=180)
                for in_flight in in_flights:
                    row = time_trainer(lab, home, in_flight, warmup, steps)
                    row.update(delay_ms=delay_ms, reach=reach, in_flight=in_flight,
                               tokens_per_s=row["steps_per_s"] * tokens_per_step)
                    rows.append(row)
                    print(f"{reach:9} {delay_ms:4.0f} ms, {in_flight} in flight: {row['steps_per_s']:5.2f} steps/s, "
                          f"{row['tokens_per_s']:6.0f} tokens/s, {row['samples_per_s']:6.0f} served samples/s, "
                          f"{row['alive']}/4 experts alive (all 4 from step {row['first']})", flush=True)
            finally:
                volunteer.stop()
                shutil.rmtree(home, ignore_errors=True)
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> None:
    from tests.test_netlab import LAB_MANIFEST
    from volunteer.core.manifest import loads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps a run (a multiple of 5)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--delays", default="0,40,100", help="one-way ms between trainer and volunteer")
    parser.add_argument("--in-flight", default="1,4", help="the trainer's --in-flight values to compare")
    args = parser.parse_args()
    if why := NetLab.available():
        sys.exit(f"no network lab here: {why}")
    if args.steps % LOG_EVERY or args.warmup % LOG_EVERY:
        sys.exit(f"--steps and --warmup must be multiples of {LOG_EVERY} (the trainer's log interval)")
    spec = loads(LAB_MANIFEST, fmt="toml").trainer
    tokens_per_step = spec.batch_size * spec.seq_len
    in_flights = [int(n) for n in args.in_flight.split(",")]
    rows = [row for d in args.delays.split(",") if d.strip()
            for row in run_lab(float(d), in_flights, args.warmup, args.steps, tokens_per_step)]
    print(f"\ntrainer steps/s ({tokens_per_step} tokens a step) behind NAT, by one-way delay:")
    for in_flight in in_flights:
        cells = [f"{r['delay_ms']:.0f} ms {r['steps_per_s']:.2f}" for r in rows
                 if r["in_flight"] == in_flight and r["reach"] == "outbound"]
        print(f"  {in_flight} in flight: " + ", ".join(cells))
    for r in rows:
        if r["reach"] == "outbound" and r["in_flight"] != in_flights[0]:
            base = next(b for b in rows if b["reach"] == "outbound" and b["delay_ms"] == r["delay_ms"]
                        and b["in_flight"] == in_flights[0])
            print(f"  {r['delay_ms']:.0f} ms: {r['in_flight']} in flight / {in_flights[0]}: "
                  f"{r['steps_per_s'] / base['steps_per_s']:.2f}x")
    direct = [r["samples_per_s"] for r in rows if r["reach"] == "direct"]
    nat = [r["samples_per_s"] for r in rows if r["reach"] == "outbound" and r["delay_ms"] == 0]
    if direct and nat:
        print(f"served samples/s at 0 ms, behind NAT / direct: {statistics.mean(nat) / statistics.mean(direct):.2f}x "
              f"(runs: NAT {', '.join(f'{x:.0f}' for x in nat)}; direct {', '.join(f'{x:.0f}' for x in direct)})")
    key = " ".join(f"{r['reach']}{r['delay_ms']:.0f}ms_x{r['in_flight']}_steps={r['steps_per_s']:.2f} "
                   f"{r['reach']}{r['delay_ms']:.0f}ms_x{r['in_flight']}_samples={r['samples_per_s']:.0f}" for r in rows)
    print(f"KEY wan_lab {key}")


if __name__ == "__main__":
    main()
