"""Off loopback, in the network lab (tests/netlab.py; root and ``ip netns`` needed): trainer steps/s with
the trainer and its volunteer 0 / 40 / 100 ms apart (one way), and served samples/s of the same
volunteer reached directly (public address) and from behind a home router with no port forward (it
dials the trainer, which calls back over that connection).

Each case is a fresh lab: a seed and a trainer on public hosts, one volunteer serving the lab
experiment's 4 experts (d_model 256: 512 KiB a call each way); once a trainer step reached all 4
experts, and ``--warmup`` steps later, the next ``--steps`` are timed from its log; the volunteer's own counters give samples/s over the
same window. Ends with one ``KEY wan_lab ...`` line.

    .venv/bin/python -m bench.wan_lab [--steps 30] [--delays 0,40,100]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.netlab import Link, NetLab

STEP = re.compile(r"step (\d+) loss (\S+), experts alive (\d+) of (\d+)")


def served(home: Path) -> int:
    from tests.test_netlab import _status

    session = _status(home).get("session", {})
    return session.get("forward_samples", 0) + session.get("backward_samples", 0)


def run_case(delay_ms: float, behind_nat: bool, warmup: int, steps: int) -> dict:
    from tests.test_netlab import Lab

    link = Link(delay=delay_ms / 2000)  # two cables between any two hosts: each takes half
    root = Path(tempfile.mkdtemp(prefix="wanb-"))
    homes = [Path(tempfile.mkdtemp(prefix="wanb-")) for _ in range(2)]
    lab = Lab(root, link=link, cloud=not behind_nat)
    try:
        volunteer = lab.volunteer(homes[0], on=lab.pc if behind_nat else lab.cloud)
        volunteer.wait_for_line(r'"event": "serving"', timeout=180)
        trainer = lab.trainer(homes[1], log_every=1)
        # timed from the first step that reached every expert, after ``warmup`` more: a NATed volunteer
        # is called only once it has dialled the trainer (<= 5 s) and the trainer has looked it up again
        first = int(trainer.wait_for_line(r"step (\d+) loss \S+ experts 4/4", timeout=300)[1])
        trainer.wait_for_line(rf"step {first + warmup} ", timeout=300)
        started, samples = time.monotonic(), served(homes[0])
        last = trainer.wait_for_line(rf"step {first + warmup + steps} ", timeout=600)
        seconds = time.monotonic() - started
        done = served(homes[0]) - samples
        alive = int(STEP.search(last.string)[3])
        trainer.stop()
        volunteer.stop()
        return dict(delay_ms=delay_ms, nat=behind_nat, steps_per_s=steps / seconds, samples_per_s=done / seconds,
                    experts_alive=alive, all_alive_at_step=first)
    finally:
        lab.close()
        for path in [root, *homes]:
            shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--delays", default="0,40,100", help="one-way ms between trainer and volunteer, "
                                                             "behind NAT; empty for none")
    parser.add_argument("--pairs", type=int, default=1, help="direct / behind-NAT rounds at 0 ms, alternated "
                                                             "(a shared machine's load moves between cases)")
    args = parser.parse_args()
    if why := NetLab.available():
        sys.exit(f"no network lab here: {why}")
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    cases = [(0.0, nat) for _ in range(args.pairs) for nat in (False, True)] + [(d, True) for d in delays if d]
    rows = []
    for delay, nat in cases:
        row = run_case(delay, nat, args.warmup, args.steps)
        rows.append(row)
        print(f"{'behind NAT (outbound)' if nat else 'public (direct)':22} {delay:5.0f} ms: "
              f"{row['steps_per_s']:6.2f} trainer steps/s, {row['samples_per_s']:8.0f} served samples/s, "
              f"{row['experts_alive']}/4 experts alive (all 4 from step {row['all_alive_at_step']})", flush=True)
    key = " ".join(f"{'nat' if r['nat'] else 'direct'}{r['delay_ms']:.0f}ms_steps={r['steps_per_s']:.2f} "
                   f"{'nat' if r['nat'] else 'direct'}{r['delay_ms']:.0f}ms_samples={r['samples_per_s']:.0f}"
                   for r in rows)
    print(f"KEY wan_lab {key}")


if __name__ == "__main__":
    main()
