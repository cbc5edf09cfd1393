"""What every benchmark shares: the bench experiment, a swarm of real processes on 127.0.0.1, a bounded
load driver, tables, and cleanup that leaves no process behind (also on errors and SIGTERM).

Run a benchmark from the repository root as ``.venv/bin/python -m bench.<name>``. Each prints its
table(s) and ends with one ``KEY`` line of figures; what it compares runs side by side in the same run,
so the ratios hold while absolute numbers move with the load of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import hivemind
import torch
from hivemind.p2p import PeerID

from coordinator_seeds.dispatch import shutdown_dht
from volunteer.core.harness import ChildProcess, stop_together
from volunteer.core.logs import setup_logging
from volunteer.core.manifest import Manifest, loads
from volunteer.core.procgroup import die_with_parent
from volunteer.core.records import join_dht

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# "serving 4 experts of NAME on cpu as PEER[, N restored from checkpoints]: uid uid ..."
SERVING = re.compile(r"serving (\d+) experts of \S+ on (\S+) as (\w+)(?:, \d+ restored from checkpoints)?: (.+)$")


# --- output --------------------------------------------------------------------------------------


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths)))
    sys.stdout.flush()


def print_key(name: str, figures: dict[str, object]) -> None:
    """The last line of every benchmark: ``KEY <bench> name=value ...``, easy to grep from run_all.sh."""
    print(f"\nKEY {name} " + " ".join(f"{k}={_cell(v)}" for k, v in figures.items()), flush=True)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[0-9.]+(e[-+]?\d+)?[x%s]?", text))


def machine_line() -> str:
    model = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor() or "?")
    return (f"machine: {os.cpu_count()} cores ({model}), torch {torch.__version__} threads "
            f"{torch.get_num_threads()}, hivemind {hivemind.__version__}, python {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.2f}")


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def bench_args(description: str, **defaults: object) -> argparse.ArgumentParser:
    """The options every benchmark takes; each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=defaults.get("seconds", 5.0),
                        help="length of one timed round")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, homes)")
    return parser


# --- the experiment the benchmarks serve ---------------------------------------------------------


@dataclass(frozen=True)
class BenchExperiment:
    """A one-layer manifest; the defaults are the shipped experiment's "small" expert type
    (``volunteer/experiments/default.toml``: d_model 64, residual_ffn 256, Adam 1e-3, max batch 1024)."""

    d_model: int = 64
    block: str = "residual_ffn"
    d_hidden: int = 256
    grid: tuple[int, ...] = (2, 4)
    max_batch_size: int = 1024
    uid_prefix: str = "bench_ffn0"
    lr: float = 0.001
    trainer_batch: int = 16
    seq_len: int = 64

    def toml(self) -> str:
        return textwrap.dedent(f"""\
            schema_version = 1
            name = "bench-lm"
            dht_prefix = "benchlm"
            d_model = {self.d_model}
            max_batch_size = {self.max_batch_size}

            [optimizer]
            name = "adam"
            lr = {self.lr}

            [[expert_types]]
            name = "bench"
            block = "{self.block}"
            d_hidden = {self.d_hidden}

            [[layers]]
            uid_prefix = "{self.uid_prefix}"
            grid = {list(self.grid)}
            expert_type = "bench"

            [trainer]
            seq_len = {self.seq_len}
            batch_size = {self.trainer_batch}
            k_best = 2
            lr = 0.003
            """)

    def manifest(self) -> Manifest:
        return loads(self.toml(), fmt="toml")

    def describe(self) -> str:
        return (f"{self.block} d_model={self.d_model} d_hidden={self.d_hidden} grid={list(self.grid)} "
                f"max_batch={self.max_batch_size} adam lr={self.lr}")


# --- a swarm of real processes -------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """What a server printed on its ``serving`` line."""

    child: ChildProcess
    home: Path | None
    peer_id: str
    uids: tuple[str, ...]
    ready_after: float  # seconds from its start to the serving line

    def planned_batch(self, default: int) -> int:
        """The max batch size the volunteer planned (its ``state/node.json``), else ``default``."""
        try:
            return int(json.loads((self.home / "state" / "node.json").read_text())["plans"][0]["max_batch_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return default


class Swarm:
    """A benchmark's swarm on loopback: an in-process bootstrap peer (the seed's role), child processes
    and client peers. ``close()`` (the ``with`` exit) stops all of it, also after an error or a SIGTERM.
    """

    def __init__(self, experiment: BenchExperiment, *, keep: bool = False):
        self.experiment, self.keep = experiment, keep
        self.root = Path(tempfile.mkdtemp(prefix="hivemind-bench-"))
        self.manifest_file = self.root / "bench-lm.toml"
        self.manifest_file.write_text(experiment.toml())
        self.children: list[ChildProcess] = []
        self.dhts: list[hivemind.DHT] = []
        self._bootstrap: hivemind.DHT | None = None

    def __enter__(self) -> Swarm:
        setup_logging(False)  # hivemind's chatter kept down, its exit-time __del__ noise dropped
        logging.getLogger("hivemind").setLevel(logging.ERROR)  # e.g. "shutdown had no effect" at exit
        die_with_parent()  # the DHT processes we fork die with us, even on SIGKILL
        signal.signal(signal.SIGTERM, _exit_on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # peers in this process

    @property
    def bootstrap(self) -> hivemind.DHT:
        """A full DHT peer with the experiment's validators, as ``coordinator-seed run`` starts."""
        if self._bootstrap is None:
            self._bootstrap = self._track(join_dht(self.experiment.manifest().dht_prefix, host=HOST))
        return self._bootstrap

    @property
    def initial_peers(self) -> list[str]:
        return [str(a) for a in self.bootstrap.get_visible_maddrs()]

    def client(self) -> hivemind.DHT:
        """A plain hivemind client peer, as any trainer would start it."""
        return self._track(hivemind.DHT(initial_peers=self.initial_peers, client_mode=True, start=True))

    def _track(self, dht: hivemind.DHT) -> hivemind.DHT:
        self.dhts.append(dht)
        return dht

    def drop(self, dht: hivemind.DHT) -> None:
        self.dhts.remove(dht)
        shutdown_dht(dht)

    # child processes

    def home(self, name: str) -> Path:
        return self.root / name

    def start_volunteer(self, name: str, *extra: str, max_experts: int = 1,
                        env: dict[str, str] | None = None, tree: Path | None = None) -> ChildProcess:
        """``tree``: run the volunteer of another source tree (an older commit's ``git archive``), to
        compare versions side by side; ``-P`` keeps the current directory's package off its path."""
        python = [sys.executable, "-P"] if tree is not None else [sys.executable]
        argv = [*python, "-m", "volunteer.cli", "start", "--experiment", str(self.manifest_file),
                "--initial-peers", ",".join(self.initial_peers), "--host", HOST, "--device", "cpu",
                "--max-experts", str(max_experts), *extra]
        env = {"VOLUNTEER_HOME": str(self.home(name)), **({"PYTHONPATH": str(tree)} if tree else {}), **(env or {})}
        return self._spawn(name, argv, env)

    def start_plain_server(self, name: str, uids: Sequence[str], max_batch_size: int) -> ChildProcess:
        argv = [sys.executable, "-m", "bench.plain_server", "--experiment", str(self.manifest_file),
                "--initial-peers", ",".join(self.initial_peers), "--max-batch-size", str(max_batch_size),
                *uids]
        return self._spawn(name, argv, {})

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> ChildProcess:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **env}
        echo = sys.stderr if os.environ.get("BENCH_ECHO") else None
        child = ChildProcess(name, argv, env=env, echo=echo)
        child.started_at, child.started_wall = time.monotonic(), time.time()
        self.children.append(child)
        return child

    def wait_serving(self, child: ChildProcess, timeout: float = 180.0) -> Served:
        """Bounded wait until the child serves (polled, so a crash is seen at once): its ``serving`` event
        (a JSON line, or the plain ``serving N experts ...`` line), or, for a volunteer whose stdout is
        its dashboard, a ``state/node.json`` written after it was spawned."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for line in child.output[seen:]:
                seen += 1
                found = parse_serving(line)
                if found is not None:
                    return Served(child, self._home_of(child), *found, time.monotonic() - child.started_at)
            state = self._state_of(child)
            if state is not None:
                return Served(child, self._home_of(child), state["peer_id"], tuple(state["uids"]),
                              time.monotonic() - child.started_at)
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}: {child.tail(8)}")
            time.sleep(0.02)
        raise TimeoutError(f"{child.name} did not start serving in {timeout:.0f} s: {child.tail(8)}")

    def _home_of(self, child: ChildProcess) -> Path | None:
        return self.home(child.name) if self.home(child.name).exists() else None

    def _state_of(self, child: ChildProcess) -> dict | None:
        home = self._home_of(child)
        try:
            state = json.loads((home / "state" / "node.json").read_text()) if home else None
        except (OSError, ValueError):
            return None
        if isinstance(state, dict) and state.get("saved", 0) >= child.started_wall and state.get("uids"):
            return state
        return None

    def stop(self, *children: ChildProcess, timeout: float = 30.0) -> None:
        """SIGTERM all at once, wait (bounded), then SIGKILL each whole process group."""
        for child in stop_together(children, timeout):
            print(f"warning: {child.name} ignored SIGTERM for {timeout:.0f} s; killed", file=sys.stderr)
        for child in children:
            if child in self.children:
                self.children.remove(child)

    def close(self) -> None:
        try:
            self.stop(*self.children)
        finally:
            for dht in reversed(self.dhts):
                try:
                    shutdown_dht(dht)
                except Exception as e:  # cleanup goes on
                    print(f"warning: DHT shutdown failed: {e}", file=sys.stderr)
            self.dhts.clear()
            left = kill_descendants()
            if left:
                print(f"warning: killed {len(left)} leftover process(es): {left}", file=sys.stderr)
            if self.keep:
                print(f"kept {self.root}", file=sys.stderr)
            else:
                shutil.rmtree(self.root, ignore_errors=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every ``finally``: children get stopped


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children of children too), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_descendants() -> list[str]:
    """SIGKILL whatever still runs below this process; returns ``pid:name`` of each.

    torch's ``torch_shm_manager`` is spared: it serves this process's shared tensors until we exit (killing
    it first makes torch abort at exit with "Broken pipe") and quits by itself once no client is left."""
    left = []
    for pid in descendants(os.getpid()):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            if name != "torch_shm_manag":
                os.kill(pid, signal.SIGKILL)
                left.append(f"{pid}:{name}")
        except (OSError, ProcessLookupError):
            continue
    return left


def parse_serving(line: str) -> tuple[str, tuple[str, ...]] | None:
    """(peer id, uids) from a ``serving`` event: a JSON line (headless volunteer) or the plain line."""
    if line.startswith("{"):
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if isinstance(event, dict) and event.get("event") == "serving":
            return event["peer_id"], tuple(event["uids"])
        return None
    match = SERVING.search(line)
    return (match.group(3), tuple(match.group(4).split())) if match else None


# --- finding experts -----------------------------------------------------------------------------


def wait_experts(dht: hivemind.DHT, uids: Sequence[str], timeout: float = 60.0) -> list:
    """``get_experts`` polled until every uid resolves, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        experts = hivemind.moe.get_experts(dht, list(uids))
        if all(e is not None for e in experts):
            return experts
        if time.monotonic() > deadline:
            missing = [u for u, e in zip(uids, experts) if e is None]
            raise TimeoutError(f"experts {missing} not visible after {timeout:.0f} s")
        time.sleep(0.1)


def in_routing_table(peer_id: str, dht: hivemind.DHT) -> bool:
    """Whether ``dht`` (a full peer) has met ``peer_id``: the moment that peer has joined the DHT."""
    return dht.run_coroutine(partial(_has_peer, PeerID.from_base58(peer_id)))


async def _has_peer(peer_id: PeerID, _dht: hivemind.DHT, node) -> bool:
    return peer_id in node.protocol.routing_table


def forget_peer(dht: hivemind.DHT, peer_id: str) -> None:
    """Drop ``peer_id`` from ``dht``'s routing table, so that its next join is seen as new."""
    dht.run_coroutine(partial(_forget, PeerID.from_base58(peer_id)))


async def _forget(peer_id: PeerID, _dht: hivemind.DHT, node) -> None:
    table = node.protocol.routing_table
    node_id = table.get(peer_id=peer_id)
    if node_id is not None:
        del table[node_id]


# --- load ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    samples: int
    calls: int
    seconds: float
    cpu: dict[str, tuple[float, float]] | None = None  # CpuMeter.used over the same time, if measured

    def cpu_ms_per_call(self, tree: str, *, p2pd: bool = False) -> float:
        return 1000 * self.cpu[tree][1 if p2pd else 0] / self.calls if self.cpu and self.calls else float("nan")

    @property
    def per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def measure(make_step: Callable[[], Callable[[], int]], seconds: float, *, threads: int = 1,
            warmup: int = 1, max_calls: int = 100_000, call_timeout: float = 120.0) -> Rate:
    """Run ``step()`` (returns the samples it did) in ``threads`` threads for about ``seconds``.

    ``make_step`` is called once per thread so each has its own tensors. Every thread first makes
    ``warmup`` untimed calls; the clock runs from when all are warm until the last call ends. A call
    that has not returned ``call_timeout`` seconds after the end raises ``TimeoutError`` (its thread is
    a daemon and is left behind)."""
    steps = [make_step() for _ in range(threads)]
    barrier = threading.Barrier(threads + 1, timeout=call_timeout * max(warmup, 1))
    stop_at: list[float] = []
    totals = [[0, 0] for _ in range(threads)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(warmup):
                steps[i]()
            barrier.wait()
            barrier.wait()  # the main thread set the deadline
            while time.monotonic() < stop_at[0] and totals[i][1] < max_calls:
                totals[i][0] += steps[i]()
                totals[i][1] += 1
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            barrier.abort()

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    started = time.monotonic()
    try:
        barrier.wait()
        started = time.monotonic()
        stop_at.append(started + seconds)
        barrier.wait()
    except threading.BrokenBarrierError:
        stop_at.append(0.0)  # threads still warming up stop after their call
    for w in workers:
        w.join(timeout=max(started + seconds + call_timeout - time.monotonic(), 0.1))
    if errors:
        raise errors[0]
    if any(w.is_alive() for w in workers) or barrier.broken:
        raise TimeoutError("a load thread did not finish its call in time")
    elapsed = time.monotonic() - started
    return Rate(sum(t[0] for t in totals), sum(t[1] for t in totals), elapsed)


def remote_step(expert, batch: int, d_model: int) -> Callable[[], Callable[[], int]]:
    """Forward and backward through a hivemind ``RemoteExpert`` (autograd), as a trainer calls it."""

    def make() -> Callable[[], int]:
        x = torch.randn(batch, d_model, requires_grad=True)
        grad = torch.randn(batch, d_model)

        def step() -> int:
            expert(x).backward(grad)
            return batch

        return step

    return make


# --- profiling -----------------------------------------------------------------------------------


def py_spy_top(pid: int, seconds: float, out: Path, *, subprocesses: bool = True,
               top: int = 12) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Sample ``pid`` (and its subprocesses) with py-spy for ``seconds``, idle threads left out.

    Returns (share of samples per process, share per function by self time), in percent of all samples,
    hottest first; the raw collapsed stacks are kept in ``out``."""
    py_spy = Path(os.environ.get("PY_SPY") or Path(sys.executable).with_name("py-spy"))  # PY_SPY: one elsewhere
    cmd = [str(py_spy), "record", "--pid", str(pid), "--nonblocking", "--format", "raw", "--rate", "100",
           "--duration", str(int(seconds)), "--output", str(out), *(["--subprocesses"] if subprocesses else [])]
    try:
        subprocess.run(cmd, capture_output=True, timeout=seconds + 60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"warning: py-spy failed: {e}", file=sys.stderr)
        return [], []
    return summarize_raw(out, top=top)


# a frame that tells which of hivemind's processes a stack belongs to
_ROLES = (("ConnectionHandler.", "connection handler"), ("TaskPool.", "task pool"), ("DHT.run", "DHT"),
          ("Runtime.", "runtime (main)"), ("RemoteExpertWorker", "client (main)"))


def summarize_raw(path: Path, *, top: int = 12) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    by_process: dict[str, int] = {}
    roles: dict[str, str] = {}
    by_function: dict[str, int] = {}
    total = 0
    for line in _read_lines(str(path)):
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        process = next((re.match(r"process (\d+)", f).group(1) for f in reversed(frames)
                        if f.startswith("process ")), "main")
        by_process[process] = by_process.get(process, 0) + n
        role = next((name for marker, name in _ROLES for f in frames if marker in f), None)
        if role and process not in roles:
            roles[process] = role
        frame = re.sub(r" \(/\S*/(site-packages|lib/python3\.\d+|main)/", " (", frames[-1])
        by_function[frame] = by_function.get(frame, 0) + n
        total += n
    processes = sorted(by_process.items(), key=lambda kv: -kv[1])[:top]
    functions = sorted(by_function.items(), key=lambda kv: -kv[1])[:top]
    return ([(f"{pid} {roles.get(pid, '')}".strip(), 100.0 * n / total) for pid, n in processes],
            [(f, 100.0 * n / total) for f, n in functions])


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by ``pid`` and every live process below it, and the part
    of it used by p2pd (hivemind's libp2p daemon, Go: invisible to py-spy)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = p2pd = 0
    for p in [pid, *descendants(pid)]:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1: stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        used = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        total += used
        p2pd += used if name == "p2pd" else 0
    return total / ticks, p2pd / ticks


class CpuMeter:
    """CPU seconds used by process trees while the ``with`` block runs: ``used[name] = (total, p2pd)``."""

    def __init__(self, **pids: int):
        self.pids, self.used = pids, {}

    def __enter__(self) -> CpuMeter:
        self._before = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name, pid in self.pids.items():
            after, before = tree_cpu_seconds(pid), self._before[name]
            self.used[name] = (after[0] - before[0], after[1] - before[1])


def with_cpu(run: Callable[[], Rate], **pids: int) -> Callable[[], Rate]:
    """``run``, also measuring the CPU time of the process trees ``pids`` (see ``CpuMeter``)."""

    def measured() -> Rate:
        with CpuMeter(**pids) as meter:
            rate = run()
        return replace(rate, cpu=meter.used)

    return measured


def alternate(runs: dict[str, Callable[[], Rate]], rounds: int) -> dict[str, list[Rate]]:
    """Run each measurement once per round, in order, ``rounds`` times (ABAB...): drift in the machine's
    load hits every side alike; compare them pairwise, round by round."""
    results: dict[str, list[Rate]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return results


def paired_ratio(a: Sequence[Rate], b: Sequence[Rate]) -> float:
    """Median over rounds of a's rate / b's rate in the same round."""
    return median(ratio(x.per_second, y.per_second) for x, y in zip(a, b))
