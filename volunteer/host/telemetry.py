"""Live machine readings for the dashboard: each GPU through NVML, the CPU and RAM through /proc.

The volunteer is a process group (hivemind forks a DHT, handlers and pools), so its own CPU and
memory share is summed over the group, not read from the main pid alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from volunteer.core.procgroup import group_members, worker_group
from volunteer.host.hardware import gpu_telemetry, read_proc_sizes

PSS_PERIOD = 30.0
MEMBERS_PERIOD = 30.0  # full /proc scans for our processes (``TelemetryReader._members``)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    utilization: float | None  # percent
    memory_used: int  # bytes
    memory_total: int
    temperature: float | None  # Celsius
    power_watts: float | None
    other_processes: int = 0  # processes of other programs using this GPU (games, other jobs)


@dataclass(frozen=True)
class CpuReading:
    cores: int
    busy_percent: float  # whole machine, 100 = every core busy
    load_average: float  # 1 minute
    memory_used: int  # bytes, whole machine
    memory_total: int
    volunteer_cpu_percent: float  # our process group, 100 = one core
    volunteer_memory: int  # bytes, proportional set size of our process group


@dataclass(frozen=True)
class Telemetry:
    cpu: CpuReading
    gpus: tuple[GpuReading, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Telemetry:
        return cls(CpuReading(**data["cpu"]), tuple(GpuReading(**g) for g in data.get("gpus", ())))


class TelemetryReader:
    """Call ``read()`` every second or two; CPU shares are measured between consecutive reads."""

    def __init__(self, groups: tuple[int, ...] | None = None, nvml: ModuleType | None = None, with_gpus: bool = True,
                 proc: Path = Path("/proc")):
        # the supervisor's group and its workers' (procgroup.isolate_workers)
        self.groups = groups if groups is not None else tuple(g for g in (os.getpgid(0), worker_group()) if g)
        self.nvml, self.with_gpus, self.proc = nvml, with_gpus, proc
        self._machine: tuple[int, int] | None = None  # (busy, total) jiffies at the last read
        self._group: tuple[float, float] | None = None  # (cpu seconds, wall time) at the last read
        self._pss: tuple[float, int] | None = None  # (when, bytes) of the last memory reading
        self._pids: tuple[float, tuple[int, ...]] | None = None  # (when, pids) of the last full scan
        self._seen_gpus = False

    def read(self) -> Telemetry:
        gpus = ()
        if self.with_gpus:
            ours = {pid for pid, _ in self._members()}
            gpus = tuple(
                GpuReading(g.index, g.name, g.utilization, g.memory_total - g.memory_free, g.memory_total,
                           g.temperature, g.power_watts, sum(1 for p in g.processes if p.pid not in ours))
                for g in gpu_telemetry(self.nvml)
            )
            self._seen_gpus = self._seen_gpus or bool(gpus)
            # never any GPU: no NVML, stop probing; once seen, a failed read is a hiccup, not an absence
            self.with_gpus = self._seen_gpus
        return Telemetry(self._read_cpu(), gpus)

    def _read_cpu(self) -> CpuReading:
        memory = read_proc_sizes(self.proc / "meminfo")
        total, available = memory.get("MemTotal", 0), memory.get("MemAvailable", 0)
        try:
            load = float((self.proc / "loadavg").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            load = 0.0
        cpu_seconds, pss = self._group_usage()
        wall = time.monotonic()
        group_percent = 0.0
        if self._group is not None and wall > self._group[1]:
            group_percent = max(0.0, 100.0 * (cpu_seconds - self._group[0]) / (wall - self._group[1]))
        self._group = (cpu_seconds, wall)
        return CpuReading(
            cores=os.cpu_count() or 1, busy_percent=self._machine_busy(), load_average=load,
            memory_used=total - available, memory_total=total,
            volunteer_cpu_percent=group_percent, volunteer_memory=pss,
        )

    def _machine_busy(self) -> float:
        try:
            values = [int(v) for v in (self.proc / "stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return 0.0
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        total = sum(values[:8])
        previous, self._machine = self._machine, (total - idle, total)
        if previous is None or total <= previous[1]:
            return 0.0
        return 100.0 * (total - idle - previous[0]) / (total - previous[1])

    def _members(self) -> list[tuple[int, list[str]]]:
        """Our groups' live processes. Finding them means reading the stat file of every process of the
        machine (hundreds on a shared box, every 2 s: most of an idle volunteer's CPU after the PSS
        fix), so the full scan runs every ``MEMBERS_PERIOD``; in between only the pids found last are
        re-read. A volunteer starts its processes at start, so a late one is missed for 30 s at most."""
        now = time.monotonic()
        if self._pids is None or now - self._pids[0] >= MEMBERS_PERIOD:
            members = [member for group in self.groups for member in group_members(group, self.proc)]
            self._pids = (now, tuple(pid for pid, _ in members))
            return members
        return [member for member in map(self._member, self._pids[1]) if member is not None]

    def _member(self, pid: int) -> tuple[int, list[str]] | None:
        """(pid, stat fields) if ``pid`` is still a live process of our groups (a pid can be reused)."""
        try:
            with open(self.proc / str(pid) / "stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        live = len(fields) > 12 and fields[0] != "Z" and fields[2] in {str(g) for g in self.groups}
        return (pid, fields) if live else None

    def _group_usage(self) -> tuple[float, int]:
        """CPU seconds and PSS bytes summed over every live process of our group.

        PSS is re-read only every ``PSS_PERIOD``: walking every process's page tables (smaps_rollup)
        was most of an idle volunteer's CPU (bench/dashboard_cost.py)."""
        cpu_ticks, pss = 0, 0
        members = self._members()
        for _, fields in members:
            cpu_ticks += int(fields[11]) + int(fields[12])  # utime + stime
        now = time.monotonic()
        if self._pss is None or now - self._pss[0] >= PSS_PERIOD:
            for pid, _ in members:
                pss += read_proc_sizes(self.proc / str(pid) / "smaps_rollup").get("Pss", 0)
            self._pss = (now, pss)
        return cpu_ticks / _CLOCK_TICKS, self._pss[1]
