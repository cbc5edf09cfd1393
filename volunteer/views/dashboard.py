"""The live terminal dashboard of a volunteer: one ``StatsSnapshot`` in, one screen out.

``render`` reads nothing but the snapshot (ages are measured against ``snapshot.time``), so
``volunteer start`` (the local collector) and ``volunteer monitor`` (a snapshot over the control
socket) draw the same screen, and tests record it. The layout is chosen when rich renders, for the
size it hands over, which is what makes a resize clean: the next frame is simply laid out anew.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Awaitable, Callable, Sequence

import trio
from rich.align import Align
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from volunteer.core.procgroup import forget_on_exit_now, on_exit_now
from volunteer.core.seed_client import Verified
from volunteer.host.telemetry import Telemetry
from volunteer.node.limits import Limits
from volunteer.node.stats import PlanView, StatsSnapshot, Totals
from volunteer.planning.devices import Device

STATE_STYLES = {"joining": "yellow", "serving": "green", "paused": "cyan", "draining": "magenta", "restarting": "yellow"}
SPARKS = "▁▂▃▄▅▆▇█"
SNAPSHOT_TIMEOUT = 5.0  # a control socket that does not answer in this long counts as lost
WIDE, TINY_WIDTH, TINY_HEIGHT = 120, 60, 14

# --- formatting: pure, unit-tested -------------------------------------------------------------


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_used(used: float, total: float) -> str:
    """``1.2/23.5 GiB``: the unit once when both share it."""
    (u, u_unit), t = format_bytes(used).split(), format_bytes(total)
    return f"{u}/{t}" if t.endswith(f" {u_unit}") else f"{u} {u_unit}/{t}"


def format_flops(flops: float) -> str:
    """Decimal prefixes, as FLOP counts are quoted: 1.2 TFLOP."""
    for power, prefix in enumerate(("", "k", "M", "G", "T", "P")):
        text = f"{flops / 1000**power:.{0 if power == 0 else 1}f}"
        if float(text) < 1000:  # the rounded text decides: never "1000.0 GFLOP"
            return f"{text} {prefix}FLOP"
    return f"{flops / 1e18:.1f} EFLOP"


def format_duration(seconds: float) -> str:
    s = max(0, int(seconds)) if math.isfinite(seconds) else 0
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_ago(then: float | None, now: float) -> str:
    return "never" if then is None else f"{format_duration(now - then)} ago"


def format_rate(per_second: float) -> str:
    return f"{per_second:.1f}" if per_second < 1000 else f"{per_second / 1000:.1f}k"


def short_id(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 12 else f"{peer_id[:6]}…{peer_id[-4:]}"


def sparkline(values: Sequence[float], width: int, height: int = 1) -> str:
    """The last ``width`` values, newest last, scaled to their maximum over ``height`` text rows.

    Zero is blank and any activity shows at least ``▁``, so an idle minute is told from a slow one."""
    values = [v if math.isfinite(v) and v > 0 else 0.0 for v in values][-width:] if width > 0 else []
    top = max(values, default=0.0)
    levels = [0 if v == 0 else max(1, round(v / top * 8 * height)) for v in values]
    return "\n".join(
        "".join(" " if level <= 8 * row else SPARKS[min(level - 8 * row, 8) - 1] for level in levels)
        for row in range(height - 1, -1, -1)
    )


# --- panels --------------------------------------------------------------------------------------


class _Fit:
    """Built for the space it gets: panels crop, so a list shows what fits instead of spilling."""

    def __init__(self, build: Callable[[int, int], RenderableType]):
        self.build = build

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.build(options.max_width, options.height or console.height)


def _bar(fraction: float | None) -> ProgressBar:
    f = min(max(fraction, 0.0), 1.0) if fraction is not None and math.isfinite(fraction) else 0.0
    style = "green" if f < 0.7 else "yellow" if f < 0.9 else "red"
    return ProgressBar(total=1.0, completed=f, complete_style=style, finished_style=style)


def _grid(bars: bool) -> Table:
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(style="bold", no_wrap=True)
    if bars:
        grid.add_column(ratio=1)
    # values never wrap: a panel's height is counted as one line per row
    grid.add_column(no_wrap=True, overflow="ellipsis", justify="right" if bars else "left", ratio=None if bars else 1)
    return grid


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _hardware(t: Telemetry | None, plans: tuple[PlanView, ...]) -> RenderableType:
    if t is None:
        return Text("no reading yet", style="dim")
    grid = _grid(bars=True)
    for g in t.gpus:
        util = ["n/a" if g.utilization is None else f"{g.utilization:.0f}%",
                "" if g.temperature is None else f"{g.temperature:.0f}°C",
                "" if g.power_watts is None else f"{g.power_watts:.0f} W"]
        grid.add_row(f"GPU{g.index}", _bar(_ratio(g.utilization or 0, 100)), " ".join(filter(None, util)))
        grid.add_row("vram", _bar(_ratio(g.memory_used, g.memory_total)), format_used(g.memory_used, g.memory_total))
    c = t.cpu
    grid.add_row("CPU", _bar(c.busy_percent / 100), f"{c.busy_percent:.0f}% load {c.load_average:.2f}")
    grid.add_row("RAM", _bar(_ratio(c.memory_used, c.memory_total)), format_used(c.memory_used, c.memory_total))
    grid.add_row("ours", _bar(c.volunteer_cpu_percent / (100 * max(c.cores, 1))),
                 f"{c.volunteer_cpu_percent:.0f}% {format_bytes(c.volunteer_memory)}")
    for view in plans:  # one row per serving device: "peak" alone, "peak0", "peak1"... with several
        budget, peak = view.plan.budget_bytes, view.measured_peak_bytes
        if not budget:
            continue
        label, used = ("peak", peak) if peak is not None else ("plan", view.plan.planned_bytes)
        suffix = _device_suffix(view.plan.device) if len(plans) > 1 else ""
        grid.add_row(label + suffix, _bar(_ratio(used, budget)), format_used(used, budget))
    if not plans:
        grid.add_row("plan", "", Text("not made yet", style="dim"))
    return grid


def _device_suffix(device: Device) -> str:
    """"0" for cuda:0: the GPU's number after a row's label; the CPU as it is written."""
    return str(device.index) if device.is_gpu else str(device)


def _swarm(s: StatsSnapshot) -> RenderableType:
    w = s.swarm
    if w is None:
        return Text("not polled yet", style="dim")
    grid = _grid(bars=False)
    grid.add_row("peers", f"{w.dht_peers} in DHT, {w.volunteers} volunteers")
    grid.add_row("grid", f"{w.covered}/{w.grid_size} uids served" if w.grid_size else "unknown")
    mine = list(w.replicas.values())
    alone = sum(1 for r in mine if r <= 1)
    grid.add_row("replicas", f"{alone}/{len(mine)} only here, max ×{max(mine)}" if mine else "none yet")
    trainer = [None if w.trainer_loss is None else f"loss {w.trainer_loss:.3f}",
               None if w.trainer_step is None else f"step {w.trainer_step:,}",
               None if w.trainer_seen is None else format_ago(w.trainer_seen, s.time)]
    grid.add_row("trainer", ", ".join(filter(None, trainer)) or Text("not seen", style="dim"))
    return grid


def _contribution(session: Totals, lifetime: Totals, verified: Verified | None = None) -> Table:
    table = Table(box=None, expand=True, header_style="bold", pad_edge=False)
    for name in ("", "session", "lifetime"):
        table.add_column(name, justify="right" if name else "left", style=None if name else "bold", no_wrap=True)
    for label, show in (
        ("samples", lambda t: f"{t.forward_samples + t.backward_samples:,}"),
        ("updates", lambda t: f"{t.optimizer_steps:,}"),
        ("FLOPs", lambda t: format_flops(t.flops)),
        ("compute", lambda t: format_duration(t.busy_seconds)),
        ("uptime", lambda t: format_duration(t.uptime_seconds)),
    ):
        table.add_row(label, show(session), show(lifetime))
    if verified is not None:  # the coordinator's leaderboard: what its trainers saw this volunteer answer
        rank = verified.rank
        table.add_row("verified", f"#{rank}/{verified.volunteers}" if rank else "",
                      f"{verified.forward_samples + verified.backward_samples:,}")
        table.add_row("audits", "", audits_text(verified))
    return table


def audits_text(verified: Verified) -> str:
    """``12 of 12 passed``, or that a failed audit banned this volunteer (issue 14)."""
    if verified.banned:
        return f"BANNED: failed an audit ({verified.passed} of {verified.audited} passed); no credit"
    return f"{verified.passed} of {verified.audited} passed"


def verified_text(verified: Verified) -> str:
    """``12,345 (#3 of 40)``: samples its trusted trainers counted, and the rank on the leaderboard."""
    samples = verified.forward_samples + verified.backward_samples
    rank = verified.rank
    return f"{samples:,}" + (f" (#{rank} of {verified.volunteers})" if rank else "")


def _experts(s: StatsSnapshot, height: int) -> RenderableType:
    if not s.experts:
        planned = sum(len(view.plan.uids) for view in s.plans)
        return Text(f"none serving yet ({planned} planned)" if planned else "none serving yet", style="dim")
    table = Table(box=None, expand=True, header_style="bold", pad_edge=False)
    for name in ("uid", "type", "samples", "fwd/s", "bwd/s", "steps", "srv", "last"):
        table.add_column(name, justify="left" if name in ("uid", "type") else "right", no_wrap=True,
                         overflow="ellipsis")
    fits = max(1, height - 1)  # the header takes a line
    shown = s.experts if len(s.experts) <= fits else s.experts[: fits - 1]
    replicas = s.swarm.replicas if s.swarm else {}
    for e in shown:
        x = e.stats
        table.add_row(x.uid, x.expert_type, f"{x.forward_samples + x.backward_samples:,}",
                      format_rate(e.forward_rate), format_rate(e.backward_rate), f"{x.optimizer_steps:,}",
                      str(replicas.get(x.uid, "-")), format_ago(x.last_request, s.time),
                      style=None if e.forward_rate or e.backward_rate else "dim")
    if len(shown) < len(s.experts):
        table.add_row(Text(f"… {len(s.experts) - len(shown)} more", style="dim"))
    return table


def _throughput(s: StatsSnapshot, width: int, height: int) -> RenderableType:
    rates = f"10 s {format_rate(s.rates.get('10s', 0.0))}, 5 min {format_rate(s.rates.get('300s', 0.0))}"
    if not any(s.history):
        return Group(Text(rates, no_wrap=True), Text("no traffic yet", style="dim"))
    return Group(Text(f"{rates}, peak {format_rate(max(s.history))}", no_wrap=True, overflow="ellipsis"),
                 Text(sparkline(s.history, width, max(1, height - 1)), style="green", justify="right", no_wrap=True))


def _events(events: Sequence[str], height: int) -> RenderableType:
    if not events:
        return Text("none yet", style="dim")
    return Text("\n".join(events[-max(1, height):]), no_wrap=True, overflow="ellipsis")


def _header(s: StatsSnapshot, width: int) -> Text:
    header = Text(no_wrap=True, overflow="ellipsis", style="on grey19")
    header.append(f" {s.experiment} ", style="bold cyan")
    header.append(f"● {s.state} ", style=f"bold {STATE_STYLES.get(s.state, 'white')}")
    header.append(f"│ up {format_duration(s.uptime)} │ {s.device} │ {short_id(s.peer_id)}")
    if s.pause_reasons:
        header.append(f" │ {'; '.join(s.pause_reasons)}", style="cyan")
    if s.reach:
        header.append(f" │ reached {s.reach['reach']}", style=REACH_STYLES.get(s.reach["reach"], "white"))
    if limits := limits_text(s.limits):
        header.append(f" │ {limits}")
    header.truncate(width, overflow="ellipsis", pad=True)  # padded, so the bar spans the screen
    return header


REACH_STYLES = {"direct": "green", "outbound": "green", "relayed": "yellow", "unreachable": "bold red"}


def limits_text(limits: Limits | None) -> str:
    """The owner's limits that are set, e.g. "power medium, 2 threads, 22-08, max 80°C"."""
    if limits is None:
        return ""
    parts = [f"power {limits.power}" if limits.power != "full" else None,
             f"{limits.cpu_threads} threads" if limits.cpu_threads else None,
             f"hours {limits.run_hours}" if limits.run_hours else None,
             f"max {limits.max_temp:.0f}°C" if limits.max_temp else None,
             "yields the GPU" if limits.pause_on_gpu_use else None]
    return ", ".join(filter(None, parts))


def _panel(body: RenderableType, title: str, ratio: int = 1) -> Layout:
    return Layout(Panel(body, title=title, title_align="left", border_style="blue", padding=(0, 1)), ratio=ratio)


def _rows(*bodies: RenderableType) -> int:
    """Lines the tallest of ``bodies`` needs inside a panel's borders, plus the borders."""
    return 2 + max(b.row_count + int(b.show_header) if isinstance(b, Table) else 1 for b in bodies)


def _screen(s: StatsSnapshot, width: int, height: int) -> RenderableType:
    if width < TINY_WIDTH or height < TINY_HEIGHT:  # too small for panels: the few numbers that matter
        grid = _grid(bars=False)
        grid.add_row("rate", f"{format_rate(s.rates.get('10s', 0.0))}/s")
        grid.add_row("samples", f"{s.session.forward_samples + s.session.backward_samples:,}")
        grid.add_row("loss", "-" if s.swarm is None or s.swarm.trainer_loss is None else f"{s.swarm.trainer_loss:.3f}")
        return Group(_header(s, width), grid, _events(s.events, 1))
    hardware, swarm = _hardware(s.telemetry, s.plans), _swarm(s)
    contribution = _contribution(s.session, s.lifetime, s.verified)
    experts = _panel(_Fit(lambda w, h: _experts(s, h)), "experts")
    spark_rows = 3 if width >= WIDE and height >= 36 else 1
    side = Layout(name="side")
    side.split_column(_panel(_Fit(lambda w, h: _throughput(s, w, h)), "samples/s"),
                      _panel(_Fit(lambda w, h: _events(s.events, h)), "events"))
    side.children[0].size = spark_rows + 3
    layout = Layout()
    if width >= WIDE:
        top, bottom = Layout(size=_rows(hardware, swarm, contribution)), Layout()
        layout.split_column(Layout(_header(s, width), size=1), top, bottom)
        # the swarm panel is wider: its trainer line is the one to keep whole
        top.split_row(_panel(hardware, "hardware", 4), _panel(swarm, "swarm", 5), _panel(contribution, "contribution", 4))
        experts.ratio, side.ratio = 3, 2
        bottom.split_row(experts, side)
    else:
        first, second = Layout(size=_rows(hardware, swarm)), Layout(size=_rows(contribution))
        layout.split_column(Layout(_header(s, width), size=1), first, second, experts)
        first.split_row(_panel(hardware, "hardware", 9), _panel(swarm, "swarm", 11))
        second.split_row(_panel(contribution, "contribution"), side)
    return layout


def render(snapshot: StatsSnapshot) -> RenderableType:
    """The whole screen for ``snapshot``, laid out for the width and height it is rendered at."""
    return _Fit(lambda width, height: _screen(snapshot, width, height))


# --- the live loop -------------------------------------------------------------------------------


class _View:
    """The latest snapshot, or since when there has been none (``volunteer monitor`` may lose its socket)."""

    def __init__(self, keys: bool):
        self.keys, self.snapshot, self.lost, self.ever = keys, None, time.monotonic(), False

    def update(self, snapshot: StatsSnapshot | None) -> None:
        if snapshot is not None:
            self.snapshot, self.lost, self.ever = snapshot, None, True
        elif self.lost is None:
            self.lost = time.monotonic()

    def renderable(self) -> RenderableType:
        if self.lost is None:
            return render(self.snapshot)
        waited = format_duration(time.monotonic() - self.lost)
        message = (f"no stats for {waited}: connection lost? retrying" if self.ever
                   else f"waiting for the volunteer's stats ({waited})") + ("\npress q to quit" if self.keys else "")
        return Align.center(Panel.fit(Text(message, justify="center"), title="hivemind-volunteer"), vertical="middle")


async def run_dashboard(get_snapshot: Callable[[], Awaitable[StatsSnapshot | None]], *, refresh: float = 1.0,
                        console: Console | None = None, keys: bool = True) -> str:
    """Show the dashboard until ``q`` is pressed (returns ``"quit"``) or the caller cancels.

    The terminal (alternate screen, cursor, cbreak mode, blocking stdin) is restored either way."""
    interval = min(max(refresh, 0.05), 1.0)  # uptime and "3s ago" tick by seconds: never skip one
    read_keys = keys and sys.stdin is not None and sys.stdin.isatty()
    view, quit_pressed = _View(read_keys), trio.Event()
    restore = _terminal_restorer(console)
    on_exit_now(restore)  # a second Ctrl-C leaves through os._exit: no finally runs then
    try:
        with Live(get_renderable=view.renderable, console=console, screen=True, auto_refresh=False) as live:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_draw, get_snapshot, view, live, interval)
                if read_keys:
                    nursery.start_soon(_wait_quit_key, quit_pressed)
                if hasattr(signal, "SIGWINCH") and threading.current_thread() is threading.main_thread():
                    nursery.start_soon(_redraw_on_resize, live)
                await quit_pressed.wait()
                nursery.cancel_scope.cancel()
    finally:
        forget_on_exit_now(restore)
    return "quit"


def _terminal_restorer(console: Console | None) -> Callable[[], None]:
    """Puts the terminal back as it was: line mode, echo, the normal screen, the cursor."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    out = console.file if console is not None else sys.stdout

    def restore() -> None:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        out.write("\x1b[?1049l\x1b[?25h")  # leave the alternate screen, show the cursor
        out.flush()

    return restore


async def _draw(get_snapshot, view: _View, live: Live, interval: float) -> None:
    tick = trio.current_time()
    while True:
        snapshot = None
        with trio.move_on_after(SNAPSHOT_TIMEOUT):
            snapshot = await get_snapshot()
        view.update(snapshot)
        live.refresh()
        tick = max(tick + interval, trio.current_time())  # after a slow fetch, do not race to catch up
        await trio.sleep_until(tick)


async def _redraw_on_resize(live: Live) -> None:
    # rich reads the terminal size at every refresh; this only makes the new size show at once
    with trio.open_signal_receiver(signal.SIGWINCH) as resizes:
        async for _ in resizes:
            live.refresh()


async def _wait_quit_key(quit_pressed: trio.Event) -> None:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    # a dup, so closing the stream leaves stdin open; FdStream puts the blocking flag back on close
    # a description of our own: FdStream makes it non-blocking, and stdin's is shared with the
    # stdout rich draws to, whose writes would then fail with BlockingIOError on a full tty buffer
    try:
        stream = trio.lowlevel.FdStream(os.open(os.ttyname(fd), os.O_RDONLY | os.O_NOCTTY))
    except OSError:
        stream = trio.lowlevel.FdStream(os.dup(fd))
    try:
        tty.setcbreak(fd, termios.TCSANOW)  # keys arrive one by one, unechoed; Ctrl-C still signals
        with contextlib.suppress(trio.BrokenResourceError):  # a hung-up terminal reads as closed
            while data := await stream.receive_some(64):
                if b"q" in data.lower():
                    quit_pressed.set()
                    return
        await trio.sleep_forever()  # stdin closed: no more keys, but the dashboard goes on
    finally:
        with contextlib.suppress(termios.error):  # a terminal that went away has no mode to restore
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        stream.close()
