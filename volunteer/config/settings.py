"""The volunteer's settings: one frozen value, built once (``volunteer.config.sources``) and passed down unchanged.

Every check here is about one value or a pair of values; where a value came from (flag, environment,
config file) is ``volunteer.config.sources``'s business, which adds it to these messages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple


class PowerLevel(NamedTuple):
    batch_fraction: float  # share of the manifest's max batch size a request may fill
    duty_cycle: float  # share of wall time spent computing; the rest is idle


POWER_LEVELS = MappingProxyType({
    "light": PowerLevel(0.25, 0.3),
    "medium": PowerLevel(0.5, 0.6),
    "full": PowerLevel(1.0, 1.0),
})


class SettingError(ValueError):
    """A bad value; ``fields`` names the settings involved so callers can say where they came from."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True)
class RunHours:
    """A daily window of whole hours, ``start`` inclusive and ``end`` exclusive; "22-08" wraps past midnight."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= 23 or not 0 <= self.end <= 24:
            raise SettingError(f"run_hours {self.start}-{self.end}: hours are 0-23 for the start and 0-24 for the end",
                               "run_hours")
        if self.start == self.end:
            raise SettingError(f"run_hours {self.start}-{self.end} is an empty window; use 0-24 for all day",
                               "run_hours")

    @classmethod
    def parse(cls, text: str) -> RunHours:
        match = re.fullmatch(r"\s*([0-9]{1,2})\s*-\s*([0-9]{1,2})\s*", text)
        if not match:
            raise SettingError(f"run_hours {text!r}: give a window of hours like 22-08 (22:00 to 08:00)", "run_hours")
        return cls(int(match.group(1)), int(match.group(2)))

    def contains(self, when: int | time | datetime) -> bool:
        hour = when if isinstance(when, int) else when.hour
        if self.start < self.end:
            return self.start <= hour < self.end
        return hour >= self.start or hour < self.end

    def __str__(self) -> str:
        return f"{self.start:02d}-{self.end:02d}"


@dataclass(frozen=True)
class Settings:
    coordinator: str | None = None  # http(s) URL of a coordinator seed
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs, used with experiment_file instead of a coordinator
    experiment_file: Path | None = None
    host: str = "0.0.0.0"  # where the DHT and expert RPCs listen
    port: int = 0  # 0 = any free port
    announce_host: str | None = None  # public address to announce, behind port forwarding
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None = every GPU, else the CPU
    gpus: str | None = None  # "0,2" or UUIDs: serve on these GPUs only (placement.pick_devices)
    max_memory: float | int | None = None  # fraction of free memory, or bytes; None = a safe default
    max_experts: int | None = None
    num_handlers: int = 2  # hivemind's default, 8 per expert, costs ~850 MiB for 4 experts (ENGINE-NOTES)
    checkpoint_interval: float = 60.0
    announce_interval: float = 20.0  # how often experts and the volunteer record are re-declared
    headless: bool = False  # JSON log lines instead of a dashboard, whatever stdout is
    log_interval: float = 10.0
    cpu_threads: int | None = None  # torch threads for serving; None = torch's default
    power: str = "full"  # a key of POWER_LEVELS
    max_temp: float | None = None  # Celsius; pause while the hottest GPU is above it
    run_hours: str | None = None  # "22-08": serve only in this daily window (local time)
    pause_on_gpu_use: bool = False  # pause while another process uses the GPU
    stats: bool = True  # count samples and sample timings; benchmarks turn it off to measure the cost
    dashboard: bool | None = None  # None = on when stdout is a terminal
    remeasure: bool = False  # re-run the throughput micro-benchmark instead of using the cached figures
    rebalance_period: float = 300.0  # mean seconds between rebalancing checks (randomised); 0 = never

    def __post_init__(self) -> None:
        if self.coordinator and self.experiment_file is not None:
            raise SettingError("coordinator and experiment_file are alternatives; set one", "coordinator",
                               "experiment_file")
        if not 0 <= self.port <= 65535:
            raise SettingError(f"port {self.port} is not a TCP port (0-65535)", "port")
        for name, most in (("num_handlers", 256), ("cpu_threads", 4096), ("max_experts", None)):
            value = getattr(self, name)
            if value is not None and not (1 <= value and (most is None or value <= most)):
                limit = f"between 1 and {most}" if most else "at least 1"
                raise SettingError(f"{name} {value} must be {limit}", name)
        if not (math.isfinite(self.rebalance_period) and self.rebalance_period >= 0):
            raise SettingError(f"rebalance_period {self.rebalance_period} must be 0 (never) or a number of seconds",
                               "rebalance_period")
        for name in ("checkpoint_interval", "announce_interval", "log_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SettingError(f"{name} {value} must be a positive number of seconds", name)
        self._check_memory()
        if self.power not in POWER_LEVELS:
            raise SettingError(f"power {self.power!r} must be one of {', '.join(POWER_LEVELS)}", "power")
        if self.max_temp is not None and not 20 <= self.max_temp <= 120:
            raise SettingError(f"max_temp {self.max_temp} must be between 20 and 120 (degrees Celsius)", "max_temp")
        if self.run_hours is not None:
            RunHours.parse(self.run_hours)
        if self.headless and self.dashboard:
            raise SettingError("headless and dashboard contradict each other; set one", "headless", "dashboard")

    def _check_memory(self) -> None:
        value = self.max_memory
        if isinstance(value, float) and not 0 < value <= 1:
            raise SettingError(f"max_memory {value} must be a fraction in (0, 1] or a size like 8GiB", "max_memory")
        if isinstance(value, int) and not 1 <= value <= 2**50:
            raise SettingError(f"max_memory {value} bytes must be between 1 and 1 PiB", "max_memory")

    def require_experiment(self) -> Settings:
        """Only ``start`` needs an experiment; ``config show`` and ``hardware`` work without one."""
        if not self.coordinator and self.experiment_file is None:
            raise SettingError(
                "no experiment configured: pass --coordinator URL, or --experiment FILE with --initial-peers, "
                "or try `volunteer demo` for a local swarm", "coordinator", "experiment_file"
            )
        return self

    @property
    def hours(self) -> RunHours | None:
        return RunHours.parse(self.run_hours) if self.run_hours is not None else None

    @property
    def power_level(self) -> PowerLevel:
        return POWER_LEVELS[self.power]

    def show_dashboard(self, stdout_is_tty: bool) -> bool:
        if self.headless:
            return False
        return stdout_is_tty if self.dashboard is None else self.dashboard
