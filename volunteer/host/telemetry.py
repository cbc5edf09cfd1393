"""Live machine readings for the dashboard: each GPU through NVML, the CPU and RAM through psutil.

The volunteer is a process group (hivemind forks a DHT, handlers and pools), so its own CPU and
memory share is summed over the group, not read from the main pid alone.

Memory: the forked processes share most of their pages (torch, hivemind), so their RSS summed would
count those pages once per process. The proportional set size (PSS) is the honest figure, but reading
it walks every process's page tables (smaps_rollup), which was most of an idle volunteer's CPU (issue
16, bench/dashboard_cost.py). So PSS is read every ``PSS_PERIOD`` only; in between, the group's RSS
(one cheap read of statm per process) moves the figure by what it grew or shrank since.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import psutil
from pydantic import TypeAdapter

from volunteer.core.procgroup import group_members, worker_group
from volunteer.host.hardware import gpu_telemetry

PSS_PERIOD = 30.0
MEMBERS_PERIOD = 30.0  # full scans of the machine's processes for ours (``TelemetryReader._members``)


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
    volunteer_memory: int  # bytes, proportional set size of our process group (module docstring)


@dataclass(frozen=True)
class Telemetry:
    cpu: CpuReading
    gpus: tuple[GpuReading, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Telemetry:
        return _TELEMETRY.validate_python(data)


_TELEMETRY = TypeAdapter(Telemetry)


class TelemetryReader:
    """Call ``read()`` every second or two; CPU shares are measured between consecutive reads."""

    def __init__(self, groups: tuple[int, ...] | None = None, nvml: ModuleType | None = None, with_gpus: bool = True):
        # the supervisor's group and its workers' (procgroup.isolate_workers)
        self.groups = groups if groups is not None else tuple(g for g in (os.getpgid(0), worker_group()) if g)
        self.nvml, self.with_gpus = nvml, with_gpus
        self._processes: dict[int, psutil.Process] = {}  # kept between reads: psutil caches what never changes
        self._scanned: float | None = None  # when the machine's processes were last scanned for ours
        self._group: tuple[float, float] | None = None  # (cpu seconds, wall time) at the last read
        self._pss: tuple[float, int, int] | None = None  # (when, PSS bytes, RSS bytes) at the last PSS read
        self._seen_gpus = False
        psutil.cpu_percent(None)  # the machine's share is measured from here to the first read

    def read(self) -> Telemetry:
        members = self._members()
        gpus = ()
        if self.with_gpus:
            ours = {p.pid for p in members}
            gpus = tuple(
                GpuReading(g.index, g.name, g.utilization, g.memory_total - g.memory_free, g.memory_total,
                           g.temperature, g.power_watts, sum(1 for p in g.processes if p.pid not in ours))
                for g in gpu_telemetry(self.nvml)
            )
            self._seen_gpus = self._seen_gpus or bool(gpus)
            # never any GPU: no NVML, stop probing; once seen, a failed read is a hiccup, not an absence
            self.with_gpus = self._seen_gpus
        return Telemetry(self._read_cpu(members), gpus)

    def _read_cpu(self, members: list[psutil.Process]) -> CpuReading:
        memory = psutil.virtual_memory()
        try:
            load = psutil.getloadavg()[0]
        except OSError:
            load = 0.0
        cpu_seconds, group_memory = self._group_usage(members)
        wall = time.monotonic()
        group_percent = 0.0
        if self._group is not None and wall > self._group[1]:
            group_percent = max(0.0, 100.0 * (cpu_seconds - self._group[0]) / (wall - self._group[1]))
        self._group = (cpu_seconds, wall)
        return CpuReading(
            cores=os.cpu_count() or 1, busy_percent=psutil.cpu_percent(None), load_average=load,
            memory_used=memory.total - memory.available, memory_total=memory.total,
            volunteer_cpu_percent=group_percent, volunteer_memory=group_memory,
        )

    def _members(self) -> list[psutil.Process]:
        """Our groups' live processes. Finding them means looking at every process of the machine
        (hundreds on a shared box, every 2 s: most of an idle volunteer's CPU once PSS was read
        rarely), so the full scan runs every ``MEMBERS_PERIOD``; in between only those found last are
        looked at again. The volunteer starts its processes at start: a late one is missed 30 s at most."""
        now = time.monotonic()
        if self._scanned is None or now - self._scanned >= MEMBERS_PERIOD:
            live = {p.pid: self._processes.get(p.pid, p) for group in self.groups for p in group_members(group)}
            self._scanned = now
        else:  # is_running() also sees through a reused pid (it compares the creation time)
            live = {pid: p for pid, p in self._processes.items() if _still_ours(p, self.groups)}
        self._processes = live
        return list(live.values())

    def _group_usage(self, members: list[psutil.Process]) -> tuple[float, int]:
        """CPU seconds and memory bytes of every live process of our group (module docstring)."""
        cpu, rss = 0.0, 0
        for process in members:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    cpu += times.user + times.system
                    rss += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # it exited while we looked
        now = time.monotonic()
        if self._pss is None or now - self._pss[0] >= PSS_PERIOD:
            self._pss = (now, _pss_of(members), rss)
        _, pss, rss_then = self._pss
        return cpu, max(0, pss + rss - rss_then)


def _pss_of(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue  # gone, or a kernel without smaps (AttributeError: no pss field)
    return total


def _still_ours(process: psutil.Process, groups: tuple[int, ...]) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) in groups
    except (OSError, psutil.Error):
        return False
