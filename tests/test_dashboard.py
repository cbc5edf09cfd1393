"""The dashboard: pure formatting helpers, the screen rendered from real stats, and the live loop.

The snapshot is the real thing: experts built by ``serving.build_backends`` run real forward and
backward passes, a ``StatsCollector`` samples their counters, ``TelemetryReader`` reads this machine.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pty
import re
import signal
import sys
import termios
import time
from functools import partial
from typing import Callable

import pytest
import torch
import trio
from rich.cells import cell_len
from rich.console import Console

from tests.conftest import TEST_MANIFEST
from volunteer.core.manifest import loads
from volunteer.core.seed_client import Verified
from volunteer.host.telemetry import GpuReading, Telemetry, TelemetryReader
from volunteer.node.limits import Limits
from volunteer.node.stats import (
    ExpertView,
    LifetimeStore,
    NodeState,
    PlanView,
    StatsCollector,
    StatsSnapshot,
    SwarmView,
    Totals,
)
from volunteer.planning.choice import Plan
from volunteer.planning.devices import Device
from volunteer.planning.memory import GiB, MiB, PlanCheck
from volunteer.serving.backends import build_backends
from volunteer.serving.checkpoints import CheckpointStore
from volunteer.views.dashboard import (
    format_ago,
    format_bytes,
    format_duration,
    format_flops,
    format_rate,
    format_used,
    render,
    run_dashboard,
    short_id,
    sparkline,
)

UIDS = ("testlm_ffn0.0.0", "testlm_ffn0.0.1", "testlm_ffn0.1.2", "testlm_ffn0.1.3")
IDLE = UIDS[-1]  # never called: its row must say so
PEER_ID = "QmTestPeer0123456789abcdefghijKLMNOPQRSTUV"
EARLIER = Totals(forward_samples=1000, backward_samples=900, optimizer_steps=90, busy_seconds=600.0,
                 flops=3.0e12, uptime_seconds=7200.0)
SIZES = [(80, 24), (160, 48)]


# --- helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536 * MiB, "1.5 GiB"),
                                     (80 * GiB, "80.0 GiB"), (3 * 1024 * GiB, "3.0 TiB"), (5000 * 1024 * GiB, "5000.0 TiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_format_used_names_a_shared_unit_once():
    assert format_used(1.2 * GiB, 23.5 * GiB) == "1.2/23.5 GiB"
    assert format_used(512 * MiB, 8 * GiB) == "512.0 MiB/8.0 GiB"


@pytest.mark.parametrize("flops, text", [(0, "0 FLOP"), (999, "999 FLOP"), (1200, "1.2 kFLOP"), (1.2e12, "1.2 TFLOP"),
                                         (999.96e9, "1.0 TFLOP"), (3.4e15, "3.4 PFLOP"), (2.5e19, "25.0 EFLOP")])
def test_format_flops(flops, text):
    assert format_flops(flops) == text


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (185, "3m05s"), (3725, "1h02m"),
                                           (86400 * 3 + 3600 * 4 + 5, "3d04h"), (-5, "0s"), (float("nan"), "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_ago_rate_and_short_id():
    assert format_ago(None, 100.0) == "never"
    assert format_ago(97.0, 100.0) == "3s ago"
    assert format_ago(105.0, 100.0) == "0s ago"  # another machine's clock ahead of ours
    assert (format_rate(12.345), format_rate(1234.0)) == ("12.3", "1.2k")
    assert short_id(PEER_ID) == "QmTest…STUV" and short_id("QmShort") == "QmShort"


def test_sparkline_scales_to_the_maximum_and_keeps_the_newest():
    assert sparkline([0, 1, 2, 4, 8], 10) == " ▁▂▄█"
    assert sparkline([0.001, 1000], 2) == "▁█"  # any activity shows, however small next to the peak
    assert sparkline(range(1, 9), 3) == "▆▇█"  # only the last three fit
    assert sparkline([0, 0, 0], 3) == "   "
    assert sparkline([], 5) == "" and sparkline([1, 2], 0) == ""
    assert sparkline([float("nan"), float("inf"), -1, 4], 4) == "   █"


def test_sparkline_over_several_rows():
    rows = sparkline([1, 8, 16], 3, height=2).split("\n")
    assert rows == ["  █", "▁██"]  # 8 of 16 fills the lower row exactly
    assert all(len(row) == 8 for row in sparkline([3, 1, 4, 1, 5, 9, 2, 6], 8, height=4).split("\n"))
    assert len(sparkline([1], 5, height=4).split("\n")) == 4


# --- rendering real stats ------------------------------------------------------------------------


def serve(backends, rounds: int) -> None:
    """Real forward and backward passes through the served experts, the idle one left alone."""
    generator = torch.Generator().manual_seed(rounds)
    for i, (uid, backend) in enumerate(backends.items()):
        if uid == IDLE:
            continue
        for _ in range(rounds):
            x = torch.randn(3 + i, 32, generator=generator)
            (out,) = backend.forward(x)
            backend.backward(x, torch.ones_like(out))


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> StatsSnapshot:
    tmp = tmp_path_factory.mktemp("dashboard")
    manifest = loads(TEST_MANIFEST, fmt="toml")
    backends, _ = build_backends(manifest, UIDS, 64, CheckpointStore(tmp / "checkpoints"))
    store = LifetimeStore(tmp / "state" / "lifetime.json")
    store.save(EARLIER)  # a previous session's totals
    plan = Plan(device=Device.parse("cpu"), budget_bytes=4 * GiB, max_batch_size=64, uids=UIDS, expert_types=("small",) * len(UIDS),
                planned_bytes=1536 * MiB, reasons=("fits",))
    collector = StatsCollector(manifest.name, PEER_ID, "cpu", [b.counters for b in backends.values()], store, [PlanView(plan)])
    reader = TelemetryReader()
    reader.read()  # CPU shares are measured between two reads
    # the sampling clock is given (on a loaded CI box two passes can take seconds): three samples
    # 10 s apart make two bars of history and a 10 s rate
    start = time.time()
    collector.sample(now=start - 20)
    serve(backends, rounds=1)
    collector.sample(now=start - 10)
    serve(backends, rounds=2)
    collector.sample(now=start)
    collector.fold(telemetry=reader.read())
    collector.fold(swarm=SwarmView(dht_peers=5, volunteers=2, grid_size=8, covered=6,
                                   replicas={uid: 1 + i % 2 for i, uid in enumerate(UIDS)},
                                   trainer_step=1234, trainer_loss=2.8712, trainer_seen=time.time() - 3))
    collector.note("joined the swarm")
    collector.note(f"serving {len(UIDS)} experts")
    return collector.snapshot(NodeState.SERVING)


def screen(snapshot: StatsSnapshot, width: int, height: int) -> str:
    console = Console(record=True, width=width, height=height, force_terminal=True, file=io.StringIO())
    console.print(render(snapshot))
    text = console.export_text()
    lines = text.rstrip("\n").split("\n")
    assert all(cell_len(line) <= width for line in lines), "a line is wider than the terminal"
    return text


def row_of(text: str, uid: str) -> list[str]:
    return next(line for line in text.splitlines() if uid in line).split()


@pytest.mark.parametrize("width, height", SIZES)
def test_render_shows_the_real_stats(snapshot: StatsSnapshot, width: int, height: int):
    assert snapshot.session.forward_samples > 0 and snapshot.rates["10s"] > 0 and len(snapshot.history) == 2
    text = screen(snapshot, width, height)
    assert len(text.rstrip("\n").split("\n")) == height  # the layout fills the screen, no more
    for expected in ("test-lm", "serving", "cpu", short_id(PEER_ID), "2.871", "step 1,234", "6/8",
                     "serving 4 experts"):
        assert expected in text, expected

    for view in snapshot.experts:
        stats = view.stats
        row = row_of(text, stats.uid)
        if stats.uid == IDLE:
            assert stats.forward_samples == 0 and "never" in row
            continue
        samples = stats.forward_samples + stats.backward_samples
        assert samples > 0 and f"{samples:,}" in row
        assert f"{stats.optimizer_steps:,}" in row and "ago" in row

    session, lifetime = snapshot.session, snapshot.lifetime
    contribution = row_of(text, " samples ")
    assert f"{session.forward_samples + session.backward_samples:,}" in contribution
    assert f"{lifetime.forward_samples + lifetime.backward_samples:,}" in contribution
    assert lifetime.forward_samples == EARLIER.forward_samples + session.forward_samples
    assert format_flops(lifetime.flops) in text
    assert f"{snapshot.telemetry.cpu.memory_total / GiB:.1f} GiB" in text
    assert any(c in text for c in "▁▂▃▄▅▆▇█")


def test_render_of_a_snapshot_that_crossed_the_control_socket(snapshot: StatsSnapshot):
    """``volunteer monitor`` renders ``from_dict(to_dict())`` over JSON: the very same screen."""
    remote = StatsSnapshot.from_dict(json.loads(json.dumps(snapshot.to_dict())))
    for width, height in SIZES:
        assert screen(remote, width, height) == screen(snapshot, width, height)


@pytest.mark.parametrize("width, height", SIZES)
def test_render_before_anything_is_known(width: int, height: int):
    now = time.time()
    text = screen(StatsSnapshot(now, "test-lm", PEER_ID, NodeState.JOINING, "cpu", started=now), width, height)
    for expected in ("joining", "no reading yet", "not polled yet", "none serving yet", "no traffic yet", "none yet"):
        assert expected in text, expected


def _checked(plan: Plan, peak: int) -> PlanView:
    """``plan`` as the telemetry poller reports it once it measured ``peak`` bytes on its device."""
    return PlanView(plan, PlanCheck.of(plan, peak))


def test_render_gpus_and_a_measured_peak(snapshot: StatsSnapshot):
    gpu = GpuReading(0, "NVIDIA H100", 87.0, 30 * GiB, 80 * GiB, 65.0, 250.0)
    with_gpu = dataclasses.replace(snapshot, telemetry=Telemetry(snapshot.telemetry.cpu, (gpu,)),
                                   plans=(_checked(snapshot.plans[0].plan, 2 * GiB),))
    for width, height in SIZES:
        text = screen(with_gpu, width, height)
        for expected in ("GPU0", "87% 65°C 250 W", "30.0/80.0 GiB", "peak", "2.0/4.0 GiB"):
            assert expected in text, expected


def test_render_and_summary_show_the_verified_contribution(snapshot: StatsSnapshot):
    from volunteer.views.monitor import summary_lines

    verified = dataclasses.replace(snapshot, verified=Verified(forward_samples=10_000, backward_samples=2_345, rank=3,
                                                              volunteers=40))
    for width, height in SIZES:
        text = screen(verified, width, height)
        assert re.search(r"verified +#3/40 +12,345", text), text
    assert "verified by the coordinator's trainers: 12,345 (#3 of 40) samples" in summary_lines(verified)
    assert "verified" not in screen(snapshot, 160, 48)  # no coordinator asked yet: no row
    assert StatsSnapshot.from_dict(verified.to_dict()) == verified


def test_render_has_a_memory_row_per_gpu(snapshot: StatsSnapshot):
    gpus = tuple(GpuReading(i, "NVIDIA H100", 50.0, 30 * GiB, 80 * GiB, 60.0, 200.0) for i in range(2))
    plans = tuple(_checked(dataclasses.replace(snapshot.plans[0].plan, device=Device.parse(f"cuda:{i}"),
                                               budget_bytes=64 * GiB), (i + 1) * 8 * GiB) for i in range(2))
    two = dataclasses.replace(snapshot, device="cuda:0,cuda:1", plans=plans,
                              telemetry=Telemetry(snapshot.telemetry.cpu, gpus))
    text = screen(two, 160, 48)
    for expected in ("GPU0", "GPU1", "peak0", "8.0/64.0 GiB", "peak1", "16.0/64.0 GiB", "cuda:0,cuda:1"):
        assert expected in text, expected


def test_render_shows_the_limits_and_why_it_is_paused(snapshot: StatsSnapshot):
    paused = dataclasses.replace(snapshot, state=NodeState.PAUSED, pause_reasons=("outside the run hours 22-08",),
                                 limits=Limits(power="medium", cpu_threads=2, run_hours="22-08", max_temp=80.0,
                                               pause_on_gpu_use=True))
    text = screen(paused, 200, 40)
    for expected in ("paused", "outside the run hours 22-08", "power medium", "2 threads", "hours 22-08",
                     "max 80°C", "yields the GPU"):
        assert expected in text, expected


def test_more_experts_than_fit_are_counted(snapshot: StatsSnapshot):
    many = tuple(ExpertView(dataclasses.replace(e.stats, uid=f"{e.stats.uid}.{n}"), e.forward_rate, e.backward_rate)
                 for n in range(5) for e in snapshot.experts)
    text = screen(dataclasses.replace(snapshot, experts=many), 80, 24)
    shown = sum(1 for e in many if e.stats.uid in text)
    assert 0 < shown < len(many) and f"… {len(many) - shown} more" in text


@pytest.mark.parametrize("width, height", [(40, 10), (20, 5), (1, 1), (59, 40), (200, 13), (60, 14), (119, 24)])
def test_render_at_any_size(snapshot: StatsSnapshot, width: int, height: int):
    text = screen(snapshot, width, height)
    if width >= 20:
        assert "test-lm" in text


# --- the live loop -------------------------------------------------------------------------------


def live_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100, height=30), out


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` every 10 ms; fail naming ``what`` after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.01)
        return
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def test_run_dashboard_draws_until_the_caller_cancels(snapshot: StatsSnapshot):
    console, out = live_console()
    calls = 0

    async def get_snapshot() -> StatsSnapshot | None:
        nonlocal calls
        calls += 1
        return None if calls == 1 else snapshot  # not available yet, then there

    async def main() -> bool:
        with trio.move_on_after(10) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(run_dashboard, get_snapshot, refresh=0.05, console=console, keys=False))
                await wait_until(lambda: calls >= 3, "the dashboard to draw the waiting screen, then the snapshot")
                os.kill(os.getpid(), signal.SIGWINCH)  # a resize redraws at once, and breaks nothing
                resized = calls
                await wait_until(lambda: calls >= resized + 2, "the dashboard to keep drawing after a resize")
                scope.cancel()  # the caller cancels: the only way it stops
        return scope.cancelled_caught

    assert trio.run(main)
    drawn = out.getvalue()
    assert calls >= 3
    assert "waiting for the volunteer's stats" in drawn
    assert drawn.count("test-lm") >= 2 and "2.871" in drawn
    assert drawn.rfind("\x1b[?1049l") > drawn.rfind("\x1b[?1049h") >= 0  # left the alternate screen
    assert drawn.rfind("\x1b[?25h") > drawn.rfind("\x1b[?25l") >= 0  # the cursor is back


def test_a_lost_snapshot_shows_the_waiting_screen(snapshot: StatsSnapshot):
    console, out = live_console()
    answers = iter([snapshot, snapshot])

    async def get_snapshot() -> StatsSnapshot | None:
        return next(answers, None)  # then the volunteer went away

    async def main() -> None:
        with trio.move_on_after(0.3):
            await run_dashboard(get_snapshot, refresh=0.05, console=console, keys=False)

    trio.run(main)
    drawn = out.getvalue()
    assert drawn.index("2.871") < drawn.index("connection lost? retrying")


class Terminal:
    """A pseudo-terminal: stdin is its slave side, a test types on (or hangs up) the master side."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def hang_up(self) -> None:
        os.close(self.master)
        self.master = None


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch):
    term = Terminal()
    stdin = open(term.slave, "r", closefd=True)  # noqa: SIM115 - closed below, after the test
    monkeypatch.setattr(sys, "stdin", stdin)
    try:
        yield term
    finally:
        stdin.close()
        if term.master is not None:
            os.close(term.master)


async def wait_cbreak(fd: int) -> None:
    await wait_until(lambda: not termios.tcgetattr(fd)[3] & termios.ICANON, "the terminal to leave canonical mode")


def test_q_quits_and_restores_the_terminal(snapshot: StatsSnapshot, terminal: Terminal):
    fd = sys.stdin.fileno()
    before, blocking = termios.tcgetattr(fd), os.get_blocking(fd)
    console, out = live_console()

    async def get_snapshot() -> StatsSnapshot:
        return snapshot

    async def type_q() -> None:
        await wait_cbreak(fd)
        assert not termios.tcgetattr(fd)[3] & termios.ECHO
        terminal.type(b"xq")

    async def main() -> str:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(type_q)
                return await run_dashboard(get_snapshot, refresh=0.05, console=console)

    assert trio.run(main) == "quit"
    assert termios.tcgetattr(fd) == before and os.get_blocking(fd) == blocking
    assert "press q" not in out.getvalue()  # the snapshot came at once: no waiting screen


def test_cancellation_restores_the_terminal(terminal: Terminal):
    fd = sys.stdin.fileno()
    before = termios.tcgetattr(fd)

    async def get_snapshot() -> None:
        return None

    async def main() -> None:
        with trio.move_on_after(3):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(run_dashboard, get_snapshot, console=live_console()[0]))
                await wait_cbreak(fd)
                nursery.cancel_scope.cancel()  # what the caller does on SIGTERM or Ctrl-C

    trio.run(main)
    assert termios.tcgetattr(fd) == before


def test_a_hung_up_terminal_does_not_end_the_dashboard(snapshot: StatsSnapshot, terminal: Terminal):
    console, _ = live_console()

    async def get_snapshot() -> StatsSnapshot:
        return snapshot

    async def main() -> bool:
        with trio.move_on_after(0.3) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(run_dashboard, get_snapshot, refresh=0.05, console=console))
                await wait_cbreak(sys.stdin.fileno())
                terminal.hang_up()
        return scope.cancelled_caught

    assert trio.run(main)


def test_the_volunteer_sees_its_own_audits() -> None:
    from volunteer.core.seed_client import Verified
    from volunteer.views.dashboard import audits_text

    assert audits_text(Verified(10, 5, 1, 3, audited=12, passed=12)) == "12 of 12 passed"
    banned = audits_text(Verified(0, 0, 2, 3, audited=4, passed=3, banned=True))
    assert banned.startswith("BANNED") and "no credit" in banned
