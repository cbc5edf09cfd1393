"""Views of a running volunteer from another process: ``volunteer status`` lines and ``volunteer monitor``.

Both read the same ``StatsSnapshot`` over the control socket that the client's own dashboard renders.
"""

from __future__ import annotations

from pathlib import Path

import trio

from volunteer.node import control
from volunteer.node.stats import StatsSnapshot, Totals
from volunteer.views.dashboard import (
    audits_text,
    format_ago,
    format_bytes,
    format_duration,
    format_flops,
    format_rate,
    limits_text,
    run_dashboard,
    verified_text,
)


def summary_lines(s: StatsSnapshot) -> list[str]:
    """A few plain lines with the figures that matter, for a terminal or a script's log."""
    state = s.state + (f" ({'; '.join(s.pause_reasons)})" if s.pause_reasons else "")
    lines = [f"{s.experiment}: {state} on {s.device} as {s.peer_id}, up {format_duration(s.uptime)}"]
    if limits := limits_text(s.limits):
        lines.append(f"limits: {limits}")
    if s.reach:
        lines.append(f"reached: {s.reach['reach']} ({s.reach['advice']})")
    lines.append(f"throughput: {format_rate(s.rates.get('10s', 0.0))} samples/s (10 s), "
                 f"{format_rate(s.rates.get('300s', 0.0))} (5 min)")
    for view in s.experts:
        e = view.stats
        lines.append(f"  {e.uid} ({e.expert_type}): {e.forward_samples:,} fwd, {e.backward_samples:,} bwd samples, "
                     f"{e.optimizer_steps:,} updates, last request {format_ago(e.last_request, s.time)}")
    lines.append(f"session: {_totals(s.session)}")
    lines.append(f"lifetime: {_totals(s.lifetime)}")
    if s.verified is not None:
        lines.append(f"verified by the coordinator's trainers: {verified_text(s.verified)} samples")
        lines.append(f"audits of its answers: {audits_text(s.verified)}")
    if s.swarm is not None:
        w = s.swarm
        trainer = f", trainer step {w.trainer_step} loss {w.trainer_loss:.3f}" if w.trainer_loss is not None else ""
        lines.append(f"swarm: {w.dht_peers} DHT peers, {w.volunteers} volunteers, "
                     f"{w.covered}/{w.grid_size} experts served{trainer}")
    if s.telemetry is not None:
        c = s.telemetry.cpu
        lines.append(f"machine: CPU {c.busy_percent:.0f}% busy, ours {c.volunteer_cpu_percent:.0f}% and "
                     f"{format_bytes(c.volunteer_memory)}"
                     + "".join(f"; GPU{g.index} {g.utilization or 0:.0f}% {format_bytes(g.memory_used)}"
                               for g in s.telemetry.gpus))
    return lines


def _totals(t: Totals) -> str:
    return (f"{t.forward_samples + t.backward_samples:,} samples, {t.optimizer_steps:,} updates, "
            f"{format_flops(t.flops)}, {format_duration(t.busy_seconds)} compute, up {format_duration(t.uptime_seconds)}")


def run_monitor(path: Path, refresh: float = 1.0) -> None:
    """The dashboard of a running (usually headless) client until `q`; fails at once if none runs."""
    control.request(path, "status")  # a one-line error before the screen switches, if nobody answers

    async def snapshot() -> StatsSnapshot | None:
        try:
            answer = await trio.to_thread.run_sync(control.request, path, "status")
        except control.ControlError:
            return None  # the dashboard shows "connection lost" and keeps asking
        return StatsSnapshot.from_dict(answer["status"])

    trio.run(lambda: run_dashboard(snapshot, refresh=refresh))
