"""The volunteer's settings: one frozen value, built once (``volunteer.config.sources``) and passed down unchanged.

``Settings`` is also the one table of settings: each field's ``setting(...)`` gives its default, how
its value is read (a ``Kind``), its check, its help and its flag, and ``KEYS`` lists those rows. The
config engine (``volunteer.config.sources``), ``volunteer config show``, the ``volunteer start``
options and the README's table are all derived from it, so a new setting is one field here.

Every check here is about one value or a pair of values; where a value came from (flag, environment,
config file) is ``volunteer.config.sources``'s business, which adds it to these messages.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from volunteer.config.kinds import (
    AUTO_BOOL,
    BOOL,
    FLOAT,
    INT,
    MEMORY,
    OPT_STR,
    PATH,
    PEERS,
    STR,
    Kind,
)

ENV_PREFIX = "VOLUNTEER_"


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


Check = Callable[[str, Any], None]  # (field name, value); raises SettingError


@dataclass(frozen=True)
class Key:
    """One row of the settings table: everything about a setting except its value."""

    kind: Kind
    help: str  # one sentence, for --help
    flag_name: str = ""  # when it is not --<name with dashes>
    negatable: bool = False  # a boolean that also has --no-<flag>, to turn off what a lower layer turned on
    unset: str = "none"  # how config show and --help word None
    check: Check | None = None  # for a value that is not None
    name: str = ""  # the Settings field, and the key in volunteer.toml; filled in from the field
    default: Any = None  # likewise

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        """Every spelling on the command line: ``--stats``, and ``--no-stats`` where it can be turned off."""
        return (self.flag, "--no-" + self.flag[2:]) if self.negatable else (self.flag,)

    def render(self, value: Any) -> Any:
        """As TOML/JSON, so that it reads back to the same value; None where unset."""
        return None if value is None else self.kind.render(value)

    def show(self, value: Any) -> str:
        """As ``volunteer config show`` prints it: JSON, or the word for unset."""
        return self.unset if value is None else json.dumps(self.render(value))


def setting(default: Any, kind: Kind, help: str, **row: Any) -> Any:
    """A ``Settings`` field that is also a row of the settings table (``KEYS``)."""
    return field(default=default, metadata={Key: Key(kind, help, **row)})


# --- checks of one value: the message names the setting, the config engine adds where it came from ---


def _tcp_port(name: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise SettingError(f"{name} {value} is not a TCP port (0-65535)", name)


def _count(most: int | None = None) -> Check:
    def check(name: str, value: int) -> None:
        if not (1 <= value and (most is None or value <= most)):
            limit = f"between 1 and {most}" if most else "at least 1"
            raise SettingError(f"{name} {value} must be {limit}", name)
    return check


def _seconds(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise SettingError(f"{name} {value} must be a positive number of seconds", name)


def _seconds_or_never(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise SettingError(f"{name} {value} must be 0 (never) or a number of seconds", name)


def _memory(name: str, value: float | int) -> None:
    if isinstance(value, float) and not 0 < value <= 1:
        raise SettingError(f"{name} {value} must be a fraction in (0, 1] or a size like 8GiB", name)
    if isinstance(value, int) and not 1 <= value <= 2**50:
        raise SettingError(f"{name} {value} bytes must be between 1 and 1 PiB", name)


def _power_level(name: str, value: str) -> None:
    if value not in POWER_LEVELS:
        raise SettingError(f"{name} {value!r} must be one of {', '.join(POWER_LEVELS)}", name)


SERVING_PATHS = ("lean", "hivemind")


def _serving_path(name: str, value: str) -> None:
    if value not in SERVING_PATHS:
        raise SettingError(f"{name} {value!r} must be one of {', '.join(SERVING_PATHS)}", name)


def _celsius(name: str, value: float) -> None:
    if not 20 <= value <= 120:
        raise SettingError(f"{name} {value} must be between 20 and 120 (degrees Celsius)", name)


def _daily_window(name: str, value: str) -> None:
    RunHours.parse(value)


@dataclass(frozen=True)
class Settings:
    """Everything the owner of the machine can set; each field is a row of the settings table."""

    coordinator: str | None = setting(None, OPT_STR, "URL of a coordinator seed (http or https).")
    initial_peers: tuple[str, ...] = setting(
        (), PEERS, "DHT multiaddrs to join, with --experiment; repeat it or separate them with commas.")
    experiment_file: Path | None = setting(
        None, PATH, "Experiment manifest (TOML or JSON), or a shipped one by name (default, base, large), instead "
        "of a coordinator.", flag_name="--experiment")
    host: str = setting("0.0.0.0", STR, "Address the DHT and expert RPCs listen on.")
    port: int = setting(0, INT, "TCP port for the DHT and experts; 0 = any free port.", check=_tcp_port)
    announce_host: str | None = setting(None, OPT_STR, "Public address to announce, behind port forwarding.")
    # behind a NAT with no port forward, trainers can call us only over connections we made
    dial_trainers: bool = setting(True, BOOL, "Dial the trainers and hold connections to them, so they can call "
                                              "back through a home router.", negatable=True)
    startup_timeout: float = setting(30.0, FLOAT, "Seconds the p2p daemon may take to start.", check=_seconds)
    device: str | None = setting(None, OPT_STR, "cpu, cuda (every GPU) or cuda:N; auto = every GPU, else the CPU.",
                                 unset="auto")
    # matched to the GPUs found by placement.pick_devices
    gpus: str | None = setting(None, OPT_STR, "Serve on these GPUs only: indices or UUIDs, like 0,2.", unset="all")
    # a fraction of free memory, or bytes; None = a safe default per device
    max_memory: float | int | None = setting(
        None, MEMORY, "Memory budget on each device: a fraction (0.5) or a size (8GiB).", unset="auto", check=_memory)
    max_experts: int | None = setting(None, INT, "Host at most this many experts.", unset="no limit",
                                      check=_count())
    # lean: hivemind's RPCs answered and batched in the computing process (serving.handler);
    # hivemind: its own Server (connection-handler and TaskPool processes), kept for comparison
    serving: str = setting("lean", STR, f"Serving path: {' or '.join(SERVING_PATHS)}.", check=_serving_path)
    # hivemind's default, 8 per expert, costs ~850 MiB for 4 experts (ENGINE-NOTES)
    num_handlers: int = setting(2, INT, "Connection handler processes (serving = hivemind).", check=_count(256))
    checkpoint_interval: float = setting(60.0, FLOAT, "Seconds between checkpoints.", check=_seconds)
    # how often experts and the volunteer record are re-declared
    announce_interval: float = setting(20.0, FLOAT, "Seconds between re-announcements in the DHT.", check=_seconds)
    # JSON log lines instead of a dashboard, whatever stdout is
    headless: bool = setting(False, BOOL, "No dashboard: JSON lines on stdout (automatic when stdout is not a "
                                          "terminal).")
    log_interval: float = setting(10.0, FLOAT, "Seconds between headless stats lines.", check=_seconds)
    # None = torch's default
    cpu_threads: int | None = setting(None, INT, "Torch threads for serving.", unset="auto", check=_count(4096))
    power: str = setting("full", STR, f"Batch size and duty cycle: {', '.join(POWER_LEVELS)}.",
                         check=_power_level)
    # pause while the hottest GPU is above it
    max_temp: float | None = setting(None, FLOAT, "Pause while the GPU is hotter than this (Celsius).",
                                     check=_celsius)
    run_hours: str | None = setting(None, OPT_STR, "Serve only in this daily window (local time), like 22-08.",
                                    unset="always", check=_daily_window)
    pause_on_gpu_use: bool = setting(False, BOOL, "Pause while another process uses the GPU.", negatable=True)
    # benchmarks turn it off to measure the cost
    stats: bool = setting(True, BOOL, "Count samples and time requests.", negatable=True)
    dashboard: bool | None = setting(None, AUTO_BOOL, "The live dashboard even when stdout is not a terminal.",
                                     unset="auto")
    remeasure: bool = setting(False, BOOL, "Re-run the throughput micro-benchmark instead of using its cache.")
    # each wait is 0.5-1.5x this, so that volunteers do not all move at once (node.supervisor)
    rebalance_period: float = setting(
        300.0, FLOAT, "Mean seconds between checks for a better choice of experts; 0 = never.",
        check=_seconds_or_never)

    def __post_init__(self) -> None:
        for key in KEYS:
            value = getattr(self, key.name)
            if key.check is not None and value is not None:
                key.check(key.name, value)
        for pair, problem in ALTERNATIVES.items():
            if all(getattr(self, name) for name in pair):
                raise SettingError(f"{' and '.join(pair)} {problem}; set one", *pair)

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


KEYS: tuple[Key, ...] = tuple(replace(f.metadata[Key], name=f.name, default=f.default) for f in fields(Settings))
KEY_BY_NAME = {key.name: key for key in KEYS}
# pairs that are one choice: the config engine lets a higher layer's replace the other
ALTERNATIVES = {("coordinator", "experiment_file"): "are alternatives",
                ("headless", "dashboard"): "contradict each other"}
