"""The owner's limits: what they allow, and pausing while any of them says so.

``limits_of`` is what the dashboard and ``volunteer status`` show; ``automatic_pause_reasons`` reads
the schedule, the GPUs' temperature and other programs on them; ``Pauser`` pauses and resumes the
node as the reasons come and go (the user's ``volunteer pause`` is one of them).
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from volunteer.config.settings import Settings
from volunteer.host.telemetry import Telemetry


@dataclass(frozen=True)
class Limits:
    """What the owner allowed, as the dashboard and ``volunteer status`` show it."""

    power: str = "full"
    cpu_threads: int | None = None
    max_memory: float | int | None = None  # a fraction of free memory, or bytes
    max_experts: int | None = None
    max_temp: float | None = None
    run_hours: str | None = None
    pause_on_gpu_use: bool = False


def limits_of(settings: Settings) -> Limits:
    return Limits(power=settings.power, cpu_threads=settings.cpu_threads, max_memory=settings.max_memory,
                  max_experts=settings.max_experts, max_temp=settings.max_temp, run_hours=settings.run_hours,
                  pause_on_gpu_use=settings.pause_on_gpu_use)


def automatic_pause_reasons(settings: Settings, telemetry: Telemetry | None, now: datetime,
                            serving_gpus: Collection[int] = ()) -> dict[str, str | None]:
    """Why the owner's limits want the volunteer paused right now; ``None`` for a limit that is met.

    ``serving_gpus``: the NVML indices we serve on. Heat and other programs count on those alone (a
    game on the other GPU is no reason to leave this one); serving on the CPU, every GPU counts."""
    reasons: dict[str, str | None] = dict(schedule=None, temperature=None, gpu_in_use=None)
    hours = settings.hours
    if hours is not None and not hours.contains(now):
        reasons["schedule"] = f"outside the run hours {hours}"
    gpus = telemetry.gpus if telemetry is not None else ()
    if serving_gpus:
        gpus = tuple(g for g in gpus if g.index in serving_gpus)
    if settings.max_temp is not None:
        hot = [g for g in gpus if g.temperature is not None and g.temperature > settings.max_temp]
        if hot:
            reasons["temperature"] = f"GPU {hot[0].index} at {hot[0].temperature:.0f} C, above {settings.max_temp:.0f} C"
    if settings.pause_on_gpu_use:
        busy = [g for g in gpus if g.other_processes]
        if busy:
            reasons["gpu_in_use"] = f"another program is using GPU {busy[0].index}"
    return reasons


class Pausable(Protocol):
    """What ``Pauser`` needs of a node (``VolunteerNode``): its state, and pausing and resuming it."""

    @property
    def state(self) -> str: ...

    @property
    def pause_reasons(self) -> tuple[str, ...]: ...

    def pause(self, reasons: tuple[str, ...]) -> None: ...

    def resume(self) -> None: ...

    def begin_drain(self) -> None: ...


class Pauser:
    """Pauses the node while any reason holds (the user, the schedule, heat, a game) and resumes it
    when none is left; the weights stay in memory all along."""

    def __init__(self, node: Pausable, settings: Settings, emit: Any, reasons: dict[str, str] | None = None,
                 serving_gpus: Collection[int] = ()):
        self.node, self.settings, self.emit = node, settings, emit  # emit: EventLog.emit
        self.serving_gpus = serving_gpus  # NVML indices (automatic_pause_reasons)
        self.reasons: dict[str, str] = dict(reasons or {})  # those of the node before a restart
        self.frozen = False
        self._lock = threading.Lock()

    def set(self, key: str, reason: str | None) -> None:
        self.update({key: reason})

    def check_limits(self, telemetry: Telemetry | None) -> None:
        self.update(automatic_pause_reasons(self.settings, telemetry, datetime.now(), self.serving_gpus))

    def update(self, reasons: dict[str, str | None]) -> None:
        """Set or clear (``None``) each reason, then pause or resume as the remaining ones say."""
        with self._lock:
            for key, reason in reasons.items():
                if reason is None:
                    self.reasons.pop(key, None)
                else:
                    self.reasons[key] = reason
            self._apply()

    def freeze(self) -> None:
        """Enter the drain: from now on no reason can pause or resume the node."""
        with self._lock:
            self.frozen = True
            self.node.begin_drain()

    def _apply(self) -> None:
        if self.frozen:
            return
        node = self.node
        reasons = tuple(self.reasons.values())
        changed = reasons != node.pause_reasons
        if reasons and node.state == "serving":
            node.pause(reasons)
            self.emit("paused", f"paused: {'; '.join(reasons)}", reasons=list(reasons))
        elif not reasons and node.state == "paused":
            node.resume()
            self.emit("resumed", "resumed serving", reasons=[])
        elif changed and reasons:
            node.pause(reasons)  # paused already: only the reasons change
            self.emit("paused", f"still paused: {'; '.join(reasons)}", reasons=list(reasons))
