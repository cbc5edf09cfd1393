"""Off loopback, in the network lab (tests/netlab.py; root and ``ip netns`` needed): trainer steps/s and
tokens/s with the trainer and its volunteer 0 / 40 / 100 ms apart (one way), one micro-batch a step
(``--in-flight 1``, before issue 12's item 4) and several in flight at once (after; a step then trains
that many micro-batches, so tokens/s is the figure to compare),
and served samples/s of the same volunteer reached directly (public address) and from behind a home
router with no port forward (it dials the trainer, which calls back over that connection).

One lab per delay: a seed and a trainer on public hosts; at 0 ms a volunteer on a public host first,
then (at every delay) one behind a home router, each serving the lab experiment's 4 experts (d_model
256: 512 KiB a call each way). Against each volunteer the trainer runs once per in-flight setting,
alternated; once a logged step saw all 4 experts alive and ``--warmup`` steps later, the next
``--steps`` are timed from its log; the volunteer's own counters give samples/s over the same window.
With ``--audit-rates 0,0.05 --rounds N`` each setting also runs at each audit rate, alternated round
by round, and the on/off ratio of tokens/s is printed per round (issue 14: audits across the WAN).
Ends with one ``KEY wan_lab ...`` line.

    .venv/bin/python -m bench.wan_lab [--steps 20] [--delays 0,40,100] [--in-flight 1,4]
                                      [--audit-rates 0.02] [--rounds 1]
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
# A trainer step moves, per MoE layer, its rows (batch x seq x k) of d_model floats 5 times: forward out
# and back, backward out twice (inputs and gradients) and back once.
CROSSINGS = 5
SEND = ("import socket,sys,time; s=socket.socket(); s.bind(('0.0.0.0', 7001)); s.listen(); print('up', flush=True);"
        "c,_=s.accept(); b=bytes(1<<16); n=0; t=time.perf_counter()\n"
        "while time.perf_counter()-t < 3: c.sendall(b); n+=len(b)\n"
        "c.close(); print(n*8/(time.perf_counter()-t)/1e6)")
RECEIVE = "import socket,sys; c=socket.create_connection((sys.argv[1], 7001)); [0 for _ in iter(lambda: c.recv(1<<16), b'')]"


def link_mbit(lab) -> float:
    """TCP throughput from the trainer's host to the home pc over the lab's cables (the pc dials out, as
    a NATed volunteer does), Mbit/s over 3 s."""
    import subprocess

    sender = subprocess.Popen(lab.trainer_host.argv(sys.executable, "-c", SEND), stdout=subprocess.PIPE, text=True)
    try:
        assert sender.stdout.readline().strip() == "up"
        lab.pc.run(sys.executable, "-c", RECEIVE, lab.trainer_host.ip, timeout=60)
        return float(sender.stdout.readline())
    finally:
        sender.kill()
        sender.wait(10)


def served(home: Path) -> int:
    from tests.test_netlab import _status

    session = _status(home).get("session", {})
    return session.get("forward_samples", 0) + session.get("backward_samples", 0)


def time_trainer(lab, volunteer_home: Path, in_flight: int, warmup: int, steps: int, audit_rate: float) -> dict:
    """One trainer run against the volunteer serving from ``volunteer_home``: steps/s over ``steps``
    steps after the first logged step with every expert alive and ``warmup`` more."""
    home = Path(tempfile.mkdtemp(prefix="wanb-"))
    trainer = lab.trainer(home, 100000, LOG_EVERY, "--in-flight", str(in_flight), "--audit-rate", str(audit_rate))
    try:
        first = int(trainer.wait_for_line(ALL_ALIVE, timeout=300)[1])
        trainer.wait_for_line(rf"step {first + warmup} ", timeout=300)
        started, samples = time.monotonic(), served(volunteer_home)
        last = trainer.wait_for_line(rf"step {first + warmup + steps} loss \S+, experts alive (\d+)", timeout=600)
        seconds = time.monotonic() - started
        done = served(volunteer_home) - samples
        audits = [line.strip() for line in list(trainer.output) if "audits: " in line]
        return dict(steps_per_s=steps / seconds, samples_per_s=done / seconds, alive=int(last[1]), first=first,
                    audits=audits[-1].split("audits: ", 1)[1] if audits else "none")
    finally:
        trainer.stop()
        shutil.rmtree(home, ignore_errors=True)


def run_lab(delay_ms: float, in_flights: list[int], warmup: int, steps: int, tokens_per_step: int,
            audit_rates: list[float], rounds: int) -> list[dict]:
    from tests.test_netlab import Lab

    link = Link(delay=delay_ms / 2000)  # two cables between any two hosts: each takes half
    root = Path(tempfile.mkdtemp(prefix="wanb-"))
    lab = Lab(root, link=link, cloud=delay_ms == 0)
    rows = []
    try:
        mbit = link_mbit(lab)
        print(f"{delay_ms:4.0f} ms: the cables carry {mbit:.0f} Mbit/s trainer -> home pc", flush=True)
        places = [("direct", lab.cloud)] if delay_ms == 0 else []
        for reach, host in [*places, ("outbound", lab.pc)]:
            home = Path(tempfile.mkdtemp(prefix="wanb-"))
            volunteer = lab.volunteer(home, on=host)
            try:
                volunteer.wait_for_line(r'"event": "serving"', timeout=180)
                for round_, in_flight, audit_rate in [(r, i, a) for r in range(rounds) for i in in_flights
                                                      for a in audit_rates]:
                    row = time_trainer(lab, home, in_flight, warmup, steps, audit_rate)
                    row.update(delay_ms=delay_ms, reach=reach, in_flight=in_flight, link_mbit=mbit, round=round_,
                               audit_rate=audit_rate, tokens_per_s=row["steps_per_s"] * tokens_per_step * in_flight)
                    rows.append(row)
                    print(f"{reach:9} {delay_ms:4.0f} ms, {in_flight} in flight, audits {audit_rate:g}: "
                          f"{row['steps_per_s']:5.2f} steps/s, {row['tokens_per_s']:6.0f} tokens/s, "
                          f"{row['samples_per_s']:6.0f} served samples/s, {row['alive']}/4 experts alive "
                          f"(all 4 from step {row['first']}); audits: {row['audits']}", flush=True)
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
    parser.add_argument("--audit-rates", default="0.02", help="the trainer's --audit-rate values to compare")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every setting, alternated")
    args = parser.parse_args()
    if why := NetLab.available():
        sys.exit(f"no network lab here: {why}")
    if args.steps % LOG_EVERY or args.warmup % LOG_EVERY:
        sys.exit(f"--steps and --warmup must be multiples of {LOG_EVERY} (the trainer's log interval)")
    manifest = loads(LAB_MANIFEST, fmt="toml")
    spec = manifest.trainer
    tokens_per_step = spec.batch_size * spec.seq_len
    mbit_per_step = CROSSINGS * tokens_per_step * spec.k_best * manifest.d_model * 4 * 8 / 1e6 * len(manifest.layers)
    in_flights = [int(n) for n in args.in_flight.split(",")]
    audit_rates = [float(a) for a in args.audit_rates.split(",")]
    rows = [row for d in args.delays.split(",") if d.strip()
            for row in run_lab(float(d), in_flights, args.warmup, args.steps, tokens_per_step, audit_rates,
                               args.rounds)]
    if len(audit_rates) > 1:
        compare_audits(rows, audit_rates)
    print(f"\ntrainer tokens/s behind NAT ({tokens_per_step} tokens a micro-batch), by one-way delay:")
    for in_flight in in_flights:
        cells = [f"{r['delay_ms']:.0f} ms {r['tokens_per_s']:.0f}" for r in rows
                 if r["in_flight"] == in_flight and r["reach"] == "outbound"]
        print(f"  {in_flight} in flight: " + ", ".join(cells))
    for r in rows:
        if r["reach"] == "outbound" and r["in_flight"] != in_flights[0]:
            base = next(b for b in rows if b["reach"] == "outbound" and b["delay_ms"] == r["delay_ms"]
                        and b["in_flight"] == in_flights[0] and b["round"] == r["round"]
                        and b["audit_rate"] == r["audit_rate"])
            print(f"  {r['delay_ms']:.0f} ms: tokens/s with {r['in_flight']} in flight / {in_flights[0]}: "
                  f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    print(f"  a micro-batch moves {mbit_per_step:.0f} Mbit through the cables: at the measured link rate the "
          "ceiling is " + ", ".join(f"{r['delay_ms']:.0f} ms {r['link_mbit'] / mbit_per_step * tokens_per_step:.0f}"
                                    " tokens/s" for r in rows
                                    if r["reach"] == "outbound" and r["in_flight"] == in_flights[0]))
    direct = [r["samples_per_s"] for r in rows if r["reach"] == "direct"]
    nat = [r["samples_per_s"] for r in rows if r["reach"] == "outbound" and r["delay_ms"] == 0]
    if direct and nat:
        print(f"served samples/s at 0 ms, behind NAT / direct: {statistics.mean(nat) / statistics.mean(direct):.2f}x "
              f"(runs: NAT {', '.join(f'{x:.0f}' for x in nat)}; direct {', '.join(f'{x:.0f}' for x in direct)})")
    key = " ".join(f"{r['reach']}{r['delay_ms']:.0f}ms_x{r['in_flight']}_a{r['audit_rate']:g}_r{r['round']}_tokens="
                   f"{r['tokens_per_s']:.0f} {r['reach']}{r['delay_ms']:.0f}ms_x{r['in_flight']}_a{r['audit_rate']:g}"
                   f"_r{r['round']}_samples={r['samples_per_s']:.0f}" for r in rows)
    print(f"KEY wan_lab {key}")


def compare_audits(rows: list[dict], audit_rates: list[float]) -> None:
    """Tokens/s with audits on / off, paired by round (runs next to each other), per setting."""
    off = audit_rates[0]
    for r in rows:
        if r["audit_rate"] != off:
            base = next(b for b in rows if b["audit_rate"] == off and b["round"] == r["round"]
                        and (b["reach"], b["delay_ms"], b["in_flight"]) == (r["reach"], r["delay_ms"], r["in_flight"]))
            print(f"  {r['reach']} {r['delay_ms']:.0f} ms, {r['in_flight']} in flight, round {r['round']}: tokens/s "
                  f"with audits {r['audit_rate']:g} / {off:g}: {r['tokens_per_s']:.0f} / {base['tokens_per_s']:.0f} = "
                  f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
