"""How long ``volunteer start`` takes to be useful, and where that time goes.

Part 1, a real ``volunteer start --max-experts 4`` process on 127.0.0.1 (first start, then a restart
of the same home, which restores identity and checkpoints), timed from the moment it is spawned to:
  identity written   its DHT process wrote ``data/identity.key`` (first start only)
  (a) DHT joined     the bootstrap peer (in this process, the seed's role) has it in its routing table
  its own 'joined'   the volunteer's own JSON event saying so (its clock; same host)
  serving line       its ``serving`` event (``serving N experts ...``)
  (b) visible        a separate, fresh client peer's ``hivemind.moe.get_experts`` over the grid names this
                     volunteer for all its uids (polled; first start only: on a restart the previous
                     run's records, with the same peer id, are still there)
  (c) first request  that client's first forward+backward through one of its experts returned
and the time from SIGTERM to its exit (drain: withdraw and wait for quiet, last checkpoint, stop).

The serving event may come after the first request is served: ``volunteer start`` measures the
throughput of its expert types (``volunteer/throughput.py``, cached) after hivemind's Server is up and
before it reports; part 2 times that measurement uncached and cached.

Part 2, the same steps in this process, one at a time: interpreter + imports (``python -c 'import
volunteer.node.node'``, its heavy parts, and ``volunteer.node.supervisor``, which ``start`` loads, in fresh
processes), the hardware probe, reading the manifest,
joining the DHT, planning, building the 4 backends (weights, Adam, one dummy forward each), starting
hivemind's Server, and the throughput measurement (``volunteer/throughput.py``) when it exists.

    .venv/bin/python -m bench.join_time [--experts 4]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import hivemind
import torch
from hivemind.p2p import PeerID

from bench._common import (
    HOST,
    BenchExperiment,
    Served,
    Swarm,
    bench_args,
    forget_peer,
    in_routing_table,
    machine_line,
    print_key,
    print_table,
    remote_step,
)

EVENTS = ("identity written", "(a) DHT joined", "serving line", "(b) visible to a client", "(c) first request")
ROWS = ("identity written", "(a) DHT joined", "its own 'joined' event", "serving line", "(b) visible to a client",
        "(c) first request")
POLL = 0.05


def wait_events(swarm: Swarm, client: hivemind.DHT, name: str, *extra: str, max_experts: int,
                timeout: float = 180.0) -> tuple[dict[str, float], Served]:
    """Start a volunteer and time each event of ``EVENTS`` from its spawn (seconds); bounded polling.

    "Visible" is when the client's ``get_experts`` over the whole grid names this volunteer's peer for
    ``max_experts`` uids, so it does not wait for the serving line. On a restart the records of the
    previous run (same peer id) are still in the DHT, so "visible" means nothing and the first request
    is tried once the serving line is out (trying a dead peer earlier puts it in libp2p's dial backoff)."""
    identity = swarm.home(name) / "data" / "identity.key"
    fresh = not identity.exists()
    uids = swarm.experiment.manifest().all_uids()
    child = swarm.start_volunteer(name, *extra, max_experts=max_experts)
    t0, deadline = child.started_at, child.started_at + timeout
    times: dict[str, float] = {}
    peer_id = None if fresh else PeerID.from_identity(identity.read_bytes()).to_base58()
    served: Served | None = None
    expert, failures = None, []
    while ("(c) first request" not in times or served is None) and time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {child.proc.returncode}: {child.tail(8)}")
        if fresh and peer_id is None and identity.exists() and identity.stat().st_size > 0:
            times["identity written"] = time.monotonic() - t0
            peer_id = PeerID.from_identity(identity.read_bytes()).to_base58()
        if peer_id and "(a) DHT joined" not in times and in_routing_table(peer_id, swarm.bootstrap):
            times["(a) DHT joined"] = time.monotonic() - t0
        if served is None and any("serving" in line for line in child.output):
            served = swarm.wait_serving(child, timeout=5.0)
            times["serving line"] = served.ready_after
        if fresh and peer_id and expert is None:
            mine = [e for e in hivemind.moe.get_experts(client, uids) if e is not None and str(e.peer_id) == peer_id]
            if len(mine) >= max_experts:
                times["(b) visible to a client"] = time.monotonic() - t0
                expert = mine[0]
        if not fresh and served is not None and expert is None:
            [expert] = hivemind.moe.get_experts(client, [served.uids[0]])
        if expert is not None and "(c) first request" not in times:
            try:
                remote_step(expert, 16, swarm.experiment.d_model)()()
                times["(c) first request"] = time.monotonic() - t0
            except Exception as e:  # not serving yet, or p2pd still in a dial backoff: try again
                failures.append(f"{time.monotonic() - t0:.1f} s: {str(e).splitlines()[0][:100]}")
        time.sleep(POLL)
    expected = EVENTS if fresh else [e for e in EVENTS if e not in ("identity written", "(b) visible to a client")]
    missing = [e for e in expected if e not in times]
    if missing or served is None:
        raise TimeoutError(f"{name}: no {missing} within {timeout:.0f} s: {failures[-3:]} {child.tail(8)}")
    if failures:
        print(f"  {name}: {len(failures)} first request(s) failed before one passed, the first at {failures[0]}")
    joined = own_event_time(child, "joined")
    if joined is not None:
        times["its own 'joined' event"] = joined
    return times, served


def own_event_time(child, event: str) -> float | None:
    """Seconds from spawn to the volunteer's own JSON event ``event`` (by its clock and ours: same host)."""
    for line in child.output:
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except ValueError:
                continue
            if isinstance(found, dict) and found.get("event") == event and "time" in found:
                return found["time"] - child.started_wall
    return None


def stop_time(swarm: Swarm, served: Served) -> float:
    started = time.monotonic()
    swarm.stop(served.child)
    return time.monotonic() - started


# --- part 2: the steps one by one, in this process ------------------------------------------------


def import_times(repeats: int = 2) -> list[tuple[str, float]]:
    """Wall time of a fresh interpreter importing each module (best of ``repeats``), minus bare start-up."""

    def best(code: str) -> float:
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
            runs.append(time.perf_counter() - started)
        return min(runs)

    bare = best("pass")
    rows = [("python start-up (bare)", bare)]
    # volunteer.cli imports the rest lazily; `volunteer start` loads volunteer.node.supervisor (node, stats, ...)
    for module in ("torch", "hivemind", "volunteer.node.node", "volunteer.node.supervisor", "volunteer.cli"):
        rows.append((f"import {module} (cumulative)", best(f"import {module}") - bare))
    return rows


def timed(steps: list[tuple[str, float]], name: str, action: Callable[[], object]) -> object:
    started = time.perf_counter()
    result = action()
    steps.append((name, time.perf_counter() - started))
    return result


def in_process_steps(swarm: Swarm, experts: int) -> list[tuple[str, float]]:
    from hivemind.moe import Server

    from volunteer.core import records as volunteer_swarm
    from volunteer.core.manifest import load
    from volunteer.host.hardware import detect_hardware
    from volunteer.planning.choice import plan_experts
    from volunteer.serving.backends import build_backends
    from volunteer.serving.checkpoints import CheckpointStore

    steps: list[tuple[str, float]] = []
    hardware = timed(steps, "hardware probe (detect_hardware)", detect_hardware)
    manifest = timed(steps, "read + validate the manifest", lambda: load(swarm.manifest_file))
    home = Path(tempfile.mkdtemp(dir=swarm.root, prefix="inprocess-"))
    dht = timed(steps, "join the DHT (join_dht: DHT process + p2pd + bootstrap)", lambda: volunteer_swarm.join_dht(
        manifest.dht_prefix, swarm.initial_peers, host=HOST, identity_path=home / "identity.key"))
    swarm.dhts.append(dht)
    server = None
    try:
        def plan():
            counts = volunteer_swarm.count_servers(dht, manifest.dht_prefix, manifest.all_uids())
            return plan_experts(hardware, manifest, counts, device="cpu", max_experts=experts)

        planned = timed(steps, "plan (count servers in the DHT + plan_experts)", plan)
        store = CheckpointStore(home / "checkpoints")
        backends, _ = timed(steps, f"build {len(planned.uids)} backends (build_backends)",
                            lambda: build_backends(manifest, planned.uids, planned.max_batch_size, store))
        server = Server(dht, backends, num_connection_handlers=2, update_period=20, device=torch.device("cpu"))
        timed(steps, "start hivemind's Server (handlers, pools, runtime)",
              lambda: server.run_in_background(await_ready=True, timeout=120))
        throughput = throughput_step(hardware, manifest, planned, home / "cache")
        steps.extend(throughput)
    finally:
        if server is not None:
            server.shutdown()  # also shuts its DHT down
            server.join(timeout=30)
            swarm.dhts.remove(dht)
    return steps


def throughput_step(hardware, manifest, plan, cache_dir: Path) -> list[tuple[str, float]]:
    """``volunteer/throughput.py`` (issue 4): measuring the plan's expert types, uncached then cached."""
    try:
        from volunteer.planning.choice import measure_plan
    except ImportError:
        return [("TODO throughput measurement: volunteer/throughput.py not there yet", float("nan"))]
    rows = []
    for label in ("uncached", "cached"):
        started = time.perf_counter()
        try:
            measure_plan(hardware, manifest, plan, cache_dir)
        except Exception as e:  # work in progress elsewhere must not stop the other figures
            return rows + [(f"throughput measurement failed: {type(e).__name__}: {e}"[:100], float("nan"))]
        rows.append((f"throughput measurement, {label} (throughput.measure_plan)", time.perf_counter() - started))
    return rows


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    args = parser.parse_args()
    exp = BenchExperiment()
    print(machine_line())
    print(f"expert: {exp.describe()}; the volunteer serves {args.experts} experts")

    with Swarm(exp, keep=args.keep) as swarm:
        runs, leave, peer_id = {}, {}, None
        for run in ("first start", "restart"):
            if peer_id is not None:  # the bootstrap still lists the old peer: forget it, so the rejoin is seen
                forget_peer(swarm.bootstrap, peer_id)
            client = swarm.client()  # a peer that never talked to this volunteer, like a new trainer
            runs[run], served = wait_events(swarm, client, "volunteer", max_experts=args.experts)
            peer_id = served.peer_id
            leave[run] = stop_time(swarm, served)
            swarm.drop(client)
        print_table("part 1: seconds from spawning `volunteer start` to each event",
                    ["event", *runs],
                    [[event, *(f"{r[event]:.2f}" if event in r else "-" for r in runs.values())] for event in ROWS]
                    + [["SIGTERM to exit (drain, checkpoint, stop)", *(f"{leave[r]:.2f}" for r in runs)]])

        imports = import_times()
        steps = in_process_steps(swarm, args.experts)
        rows = [[name, f"{seconds:.3f}"] for name, seconds in imports + steps]
        print_table("part 2: the steps one by one (imports in fresh interpreters; the rest in this process)",
                    ["step", "seconds"], rows)

        first = runs["first start"]
        figures = {
            "dht_joined_s": f"{first['(a) DHT joined']:.2f}", "visible_s": f"{first['(b) visible to a client']:.2f}",
            "first_request_s": f"{first['(c) first request']:.2f}",
            "serving_line_s": f"{first['serving line']:.2f}",
            "restart_first_request_s": f"{runs['restart']['(c) first request']:.2f}",
            "import_volunteer_node_s": f"{dict(imports)['import volunteer.node.node (cumulative)']:.2f}",
            "shutdown_s": f"{leave['first start']:.2f}",
        }
        print_key("join_time", figures)


if __name__ == "__main__":
    main()
