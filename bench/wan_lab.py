"""Off loopback, in the network lab (tests/netlab.py; root and ``ip netns`` needed): trainer steps/s and
tokens/s with the trainer and its volunteer 0 / 40 / 100 ms apart (one way), one micro-batch a step
(``--in-flight 1``, before issue 12's item 4) and several in flight at once (after; a step then trains
that many micro-batches, so tokens/s is the figure to compare),
and served samples/s of the same volunteer reached directly (public address) and from behind a home
router with no port forward (it dials the trainer, which calls back over that connection); and the
experiment's wire dtype (the manifest's ``wire_dtype``: float32, or float16 = half the bytes a call).

One lab per delay and wire dtype (the wire dtypes alternate which goes first from one delay to the
next): a seed and a trainer on public hosts; at 0 ms a volunteer on a public host first (unless
``--no-direct``), then (at every delay) one behind a home router, each serving the lab experiment's 4
experts (d_model 256: 512 KiB a call each way in float32). Against each volunteer the trainer runs once
per in-flight setting; once a logged step saw all 4 experts alive and ``--warmup`` steps later, the next
``--steps`` are timed from its log, every logged step (5) an interval whose rates give the spread; the
volunteer's own counters give samples/s over the same window. Ends with one ``KEY wan_lab ...`` line.

    .venv/bin/python -m bench.wan_lab [--steps 20] [--delays 0,40,100] [--in-flight 1,4] [--wire float32,float16]
"""

from __future__ import annotations

import argparse
import re
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


AUDIT_RATE = ["0"]  # the trainer's --audit-rate, from the command line


def time_trainer(lab, volunteer_home: Path, in_flight: int, warmup: int, steps: int) -> dict:
    """One trainer run against the volunteer serving from ``volunteer_home``: steps/s over ``steps``
    steps after the first logged step with every expert alive and ``warmup`` more, and the slowest and
    fastest logged interval's."""
    home = Path(tempfile.mkdtemp(prefix="wanb-"))
    # audits off unless --audit-rate says otherwise: this bench times the wire; audits' own cost across the
    # lab was measured side by side with the pre-merge script (bench/README.md, "Audits across the WAN")
    trainer = lab.trainer(home, 100000, LOG_EVERY, "--in-flight", str(in_flight), "--audit-rate", AUDIT_RATE[0])
    try:
        first = int(trainer.wait_for_line(ALL_ALIVE, timeout=300)[1])
        trainer.wait_for_line(rf"step {first + warmup} ", timeout=300)
        started, samples = time.monotonic(), served(volunteer_home)
        marks = [started]
        for step in range(first + warmup + LOG_EVERY, first + warmup + steps + 1, LOG_EVERY):
            last = trainer.wait_for_line(rf"step {step} loss \S+, experts alive (\d+)", timeout=600)
            marks.append(time.monotonic())
        seconds = marks[-1] - started
        done = served(volunteer_home) - samples
        rates = [LOG_EVERY / (b - a) for a, b in zip(marks, marks[1:])]
        return dict(steps_per_s=steps / seconds, samples_per_s=done / seconds, alive=int(last[1]), first=first,
                    low=min(rates), high=max(rates))
    finally:
        trainer.stop()
        shutil.rmtree(home, ignore_errors=True)


def run_lab(delay_ms: float, wire: str, in_flights: list[int], warmup: int, steps: int, tokens_per_step: int,
            direct: bool) -> list[dict]:
    from tests.test_netlab import Lab

    link = Link(delay=delay_ms / 2000)  # two cables between any two hosts: each takes half
    root = Path(tempfile.mkdtemp(prefix="wanb-"))
    direct = direct and delay_ms == 0
    lab = Lab(root, manifest=lab_manifest(wire), link=link, cloud=direct)
    rows = []
    try:
        mbit = link_mbit(lab)
        print(f"{delay_ms:4.0f} ms, {wire} on the wire: the cables carry {mbit:.0f} Mbit/s trainer -> home pc", flush=True)
        places = [("direct", lab.cloud)] if direct else []
        for reach, host in [*places, ("outbound", lab.pc)]:
            home = Path(tempfile.mkdtemp(prefix="wanb-"))
            volunteer = lab.volunteer(home, on=host)
            try:
                volunteer.wait_for_line(r'"event": "serving"', timeout=180)
                for in_flight in in_flights:
                    row = time_trainer(lab, home, in_flight, warmup, steps)
                    tokens = tokens_per_step * in_flight
                    row.update(delay_ms=delay_ms, wire=wire, reach=reach, in_flight=in_flight, link_mbit=mbit,
                               tokens_per_s=row["steps_per_s"] * tokens, tokens_low=row["low"] * tokens,
                               tokens_high=row["high"] * tokens)
                    rows.append(row)
                    print(f"{reach:9} {delay_ms:4.0f} ms, {wire}, {in_flight} in flight: {row['steps_per_s']:5.2f} "
                          f"steps/s, {row['tokens_per_s']:6.0f} tokens/s ({row['tokens_low']:.0f}-"
                          f"{row['tokens_high']:.0f} by interval), {row['samples_per_s']:6.0f} served samples/s, "
                          f"{row['alive']}/4 experts alive (all 4 from step {row['first']})", flush=True)
            finally:
                volunteer.stop()
                shutil.rmtree(home, ignore_errors=True)
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def lab_manifest(wire: str) -> str:
    """The lab's experiment with ``wire`` as its wire dtype (a top-level key: before the first table)."""
    from tests.test_netlab import LAB_MANIFEST

    return re.sub(r'(?m)^wire_dtype = .*$', f'wire_dtype = "{wire}"', LAB_MANIFEST, count=1)


def wire_bytes(d_model: int, wire: str) -> int:
    """Bytes of one row of activations or gradients on the wire (float16: hivemind's MEANSTD_16BIT, two
    bytes a value and a float32 mean and deviation a row)."""
    return d_model * 4 if wire == "float32" else d_model * 2 + 8


def report(rows: list[dict], in_flights: list[int], wires: list[str], tokens_per_step: int, rows_per_step: int,
           d_model: int) -> None:
    outbound = [r for r in rows if r["reach"] == "outbound"]

    def find(delay: float, wire: str, in_flight: int) -> dict | None:
        return next((r for r in outbound if (r["delay_ms"], r["wire"], r["in_flight"]) == (delay, wire, in_flight)), None)

    print(f"\ntrainer tokens/s behind NAT ({tokens_per_step} tokens a micro-batch; the slowest-fastest logged "
          "interval in brackets; % of the same setting's 0 ms):")
    for wire in wires:
        for in_flight in in_flights:
            cells = []
            for r in (r for r in outbound if (r["wire"], r["in_flight"]) == (wire, in_flight)):
                base = find(0.0, wire, in_flight)
                share = f", {r['tokens_per_s'] / base['tokens_per_s']:.0%}" if base else ""
                cells.append(f"{r['delay_ms']:.0f} ms {r['tokens_per_s']:.0f} ({r['tokens_low']:.0f}-"
                             f"{r['tokens_high']:.0f}{share})")
            print(f"  {wire}, {in_flight} in flight: " + "; ".join(cells))
    for r in outbound:
        if r["wire"] != wires[0] and (base := find(r["delay_ms"], wires[0], r["in_flight"])) is not None:
            print(f"  {r['delay_ms']:.0f} ms, {r['in_flight']} in flight: tokens/s with {r['wire']} / {wires[0]}: "
                  f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x")
        if r["in_flight"] != in_flights[0] and (base := find(r["delay_ms"], r["wire"], in_flights[0])) is not None:
            print(f"  {r['delay_ms']:.0f} ms, {r['wire']}: tokens/s with {r['in_flight']} in flight / "
                  f"{in_flights[0]}: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    for wire in wires:
        mbit = CROSSINGS * rows_per_step * wire_bytes(d_model, wire) * 8 / 1e6
        ceilings = [f"{r['delay_ms']:.0f} ms {r['link_mbit'] / mbit * tokens_per_step:.0f}"
                    for r in outbound if r["wire"] == wire and r["in_flight"] == in_flights[0]]
        print(f"  {wire}: a micro-batch moves {mbit:.0f} Mbit through the cables; at the measured one-stream rate "
              f"that is {', '.join(ceilings)} tokens/s")
    direct = [r["samples_per_s"] for r in rows if r["reach"] == "direct"]
    nat = [r["samples_per_s"] for r in outbound if r["delay_ms"] == 0]
    if direct and nat:
        print(f"served samples/s at 0 ms, behind NAT / direct: {statistics.mean(nat) / statistics.mean(direct):.2f}x "
              f"(runs: NAT {', '.join(f'{x:.0f}' for x in nat)}; direct {', '.join(f'{x:.0f}' for x in direct)})")
    key = " ".join(f"{r['reach']}{r['delay_ms']:.0f}ms_{r['wire']}_x{r['in_flight']}_tokens={r['tokens_per_s']:.0f} "
                   f"{r['reach']}{r['delay_ms']:.0f}ms_{r['wire']}_x{r['in_flight']}_samples={r['samples_per_s']:.0f}"
                   for r in rows)
    print(f"KEY wan_lab {key}")


def main() -> None:
    from tests.test_netlab import LAB_MANIFEST
    from volunteer.core.manifest import WIRE_DTYPES, loads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps a run (a multiple of 5)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--delays", default="0,40,100", help="one-way ms between trainer and volunteer")
    parser.add_argument("--in-flight", default="1,4", help="the trainer's --in-flight values to compare")
    parser.add_argument("--wire", default="float32,float16", help="the experiment's wire dtypes to compare")
    parser.add_argument("--audit-rate", default="0", help="the trainer's --audit-rate (0: no audits)")
    parser.add_argument("--no-direct", dest="direct", action="store_false",
                        help="skip the volunteer on a public host at 0 ms (NAT vs direct)")
    args = parser.parse_args()
    AUDIT_RATE[0] = str(float(args.audit_rate))
    if why := NetLab.available():
        sys.exit(f"no network lab here: {why}")
    if args.steps % LOG_EVERY or args.warmup % LOG_EVERY:
        sys.exit(f"--steps and --warmup must be multiples of {LOG_EVERY} (the trainer's log interval)")
    wires = [w.strip() for w in args.wire.split(",") if w.strip()]
    if not wires or set(wires) - set(WIRE_DTYPES):
        sys.exit(f"--wire takes a list of {', '.join(WIRE_DTYPES)}")
    manifest = loads(LAB_MANIFEST, fmt="toml")
    spec = manifest.trainer
    tokens_per_step = spec.batch_size * spec.seq_len
    rows_per_step = tokens_per_step * spec.k_best * len(manifest.layers)
    in_flights = [int(n) for n in args.in_flight.split(",")]
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    rows = []
    for i, delay in enumerate(delays):
        for wire in (wires if i % 2 == 0 else wires[::-1]):  # which goes first alternates: drift spreads evenly
            rows += run_lab(delay, wire, in_flights, args.warmup, args.steps, tokens_per_step, args.direct)
    rows.sort(key=lambda r: (r["reach"], r["delay_ms"], wires.index(r["wire"]), r["in_flight"]))
    report(rows, in_flights, wires, tokens_per_step, rows_per_step, manifest.d_model)


if __name__ == "__main__":
    main()
