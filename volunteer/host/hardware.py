"""What this machine has to lend: CPU cores, RAM and NVIDIA GPUs.

GPUs are read through NVML (``pynvml``) rather than torch, so detection needs no CUDA context and
works before anything heavy is imported. No GPU stack is ever required: any NVML failure yields a
CPU-only profile whose ``nvml_error`` tells the user why no GPU was found. The profile crosses
process boundaries as JSON: ``to_dict`` / ``from_dict`` go through pydantic ``TypeAdapter``s over the
frozen dataclasses, which also load profiles saved before newer fields existed (their defaults stand in).

NVML numbers GPUs in PCI bus order and names them by UUID; torch numbers the GPUs it can see
(``CUDA_VISIBLE_DEVICES``) in its own order. ``match_torch_devices`` joins the two by UUID; which
devices to serve on is chosen in ``planning.devices``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from pydantic import TypeAdapter

_T = TypeVar("_T")


@dataclass(frozen=True)
class GPUProcess:
    """A process already holding memory on a GPU: what the volunteer shares the device with."""

    pid: int  # as the driver sees it: inside a container this is usually the host's pid
    used_memory: int | None  # bytes; None where the driver cannot say (e.g. Windows WDDM)
    name: str | None = None  # None when NVML may not read it (another user's process, another pid namespace)
    kind: str = "compute"  # "compute" (CUDA) or "graphics" (a display server, a game)

    def to_dict(self) -> dict[str, Any]:
        return _json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPUProcess:
        return _adapter(cls).validate_python(data)


@dataclass(frozen=True)
class GPUInfo:
    index: int  # NVML index, i.e. PCI bus order (torch matches it under CUDA_DEVICE_ORDER=PCI_BUS_ID)
    name: str
    uuid: str
    memory_total: int  # bytes
    memory_free: int  # bytes
    utilization: float | None = None  # percent
    temperature: float | None = None  # Celsius
    power_watts: float | None = None
    compute_capability: tuple[int, int] | None = None
    processes: tuple[GPUProcess, ...] = ()  # other processes on this GPU when it was read

    def to_dict(self) -> dict[str, Any]:
        return _json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPUInfo:
        return _adapter(cls).validate_python(data)


@dataclass(frozen=True)
class CPUInfo:
    cores: int
    memory_total: int  # bytes
    memory_available: int  # bytes
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CPUInfo:
        return _adapter(cls).validate_python(data)


@dataclass(frozen=True)
class HardwareProfile:
    cpu: CPUInfo
    gpus: tuple[GPUInfo, ...] = ()
    nvml_error: str | None = None  # why no GPU was found, shown to the user
    driver_version: str | None = None  # e.g. "550.54.15"
    cuda_driver_version: str | None = None  # the newest CUDA the driver supports, e.g. "12.4"

    def to_dict(self) -> dict[str, Any]:
        return _json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        return _adapter(cls).validate_python(data)


@functools.cache
def _adapter(kind: type[_T]) -> TypeAdapter[_T]:
    # built on first use, once per type: the CLI's fast paths never pay for a schema they do not need
    return TypeAdapter(kind)


def _json(value: Any) -> dict[str, Any]:
    return _adapter(type(value)).dump_python(value, mode="json")


def detect_hardware(nvml: ModuleType | None = None, root: Path = Path("/")) -> HardwareProfile:
    """Read CPU, RAM and GPUs; ``nvml`` and ``root`` (where /proc and /sys live) are test seams."""
    reading = _read_nvml(nvml)
    return HardwareProfile(detect_cpu(root), reading.gpus, reading.error, reading.driver, reading.cuda)


def gpu_telemetry(nvml: ModuleType | None = None) -> tuple[GPUInfo, ...]:
    """Re-read the GPUs (free memory, utilization, temperature, power) for dashboards; () without NVML."""
    return _read_nvml(nvml).gpus


# --- finding the GPUs in torch -------------------------------------------------------------------


def match_torch_devices(profile: HardwareProfile, cuda: Any | None = None) -> dict[str, int]:
    """NVML UUID -> torch ``cuda:N`` index, for the GPUs torch can see; {} on a CPU-only machine.

    torch is imported, and asked whether CUDA works, only when NVML found a GPU: on a CPU box this
    must stay free, and ``is_available`` is what loads the CUDA driver. ``cuda`` (``torch.cuda``'s
    surface) is a test seam.
    """
    if not profile.gpus:
        return {}
    if cuda is None:
        import torch

        cuda = torch.cuda
    if not cuda.is_available():
        return {}
    known = {bare_uuid(g.uuid): g.uuid for g in profile.gpus}
    matches: dict[str, int] = {}
    for index in range(cuda.device_count()):
        uuid = torch_uuid(cuda.get_device_properties(index))
        nvml_uuid = known.get(bare_uuid(uuid)) if uuid is not None else None
        if nvml_uuid is not None:
            matches[nvml_uuid] = index
    return matches


def torch_uuid(properties: Any) -> str | None:
    """A torch device's UUID as 8-4-4-4-12 hex (NVML's, less its "GPU-"); None before torch 2.4."""
    raw = getattr(properties, "uuid", None)
    if raw is None:
        return None
    data = getattr(raw, "bytes", None)  # the 16 raw bytes: immune to changes in how torch prints it
    if isinstance(data, bytes) and len(data) == 16:
        return str(uuid_module.UUID(bytes=data))
    return str(raw)


def bare_uuid(uuid: str) -> str:
    """A UUID as torch and ``CUDA_VISIBLE_DEVICES`` may write it: lower case, without NVML's "GPU-"."""
    return uuid.lower().removeprefix("gpu-")


# --- reading NVML --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NVMLReading:
    gpus: tuple[GPUInfo, ...] = ()
    error: str | None = None
    driver: str | None = None
    cuda: str | None = None


def _read_nvml(nvml: ModuleType | Any | None) -> _NVMLReading:
    # NVML is a C library behind ctypes: a missing library, a missing or mismatched driver, or an old
    # binding surface as NVMLError subclasses, OSError, ImportError or AttributeError. A broken GPU
    # stack must degrade to a CPU volunteer, never crash the client, hence the broad except.
    try:
        nvml = nvml if nvml is not None else _import_pynvml()
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - see above
        return _NVMLReading(error=_nvml_reason(e))
    try:
        gpus = tuple(_read_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
        driver = _optional(nvml, lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        cuda = _optional(nvml, lambda: _cuda_version(nvml.nvmlSystemGetCudaDriverVersion()))
    except Exception as e:  # noqa: BLE001 - see above
        return _NVMLReading(error=_nvml_reason(e))
    finally:
        # nothing useful to do if shutdown fails; the readings are already taken
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    return _NVMLReading(gpus, None if gpus else "NVML found no NVIDIA GPU", driver, cuda)


def _cuda_version(value: int) -> str:
    return f"{value // 1000}.{value % 1000 // 10}"  # NVML encodes CUDA 12.4 as 12040


def _import_pynvml() -> ModuleType:
    import pynvml  # imported lazily: a missing binding is just another reason to run on the CPU

    return pynvml


def _nvml_reason(error: Exception) -> str:
    kind = type(error).__name__
    if isinstance(error, ImportError):
        return "NVML bindings not installed (pip install nvidia-ml-py)"
    if kind == "NVMLError_LibraryNotFound":
        return "NVML not found: libnvidia-ml.so.1 (is the NVIDIA driver installed?)"
    message = (str(error).splitlines() or [""])[0]
    return f"NVML failed: {kind}: {message}" if message else f"NVML failed: {kind}"


def _read_gpu(nvml: Any, index: int) -> GPUInfo:
    """Name, uuid and memory are required; the rest is optional (consumer GPUs lack some sensors)."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(nvml, lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
    temperature = _optional(nvml, lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
    power = _optional(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)  # NVML reports milliwatts
    capability = _optional(nvml, lambda: tuple(map(int, nvml.nvmlDeviceGetCudaComputeCapability(handle))))
    processes = _processes(nvml, handle)
    return GPUInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        memory_total=int(memory.total),
        memory_free=int(memory.free),
        utilization=utilization,
        temperature=temperature,
        power_watts=power,
        compute_capability=capability,  # type: ignore[arg-type]  # a pair, NVML returns (major, minor)
        processes=processes,
    )


def _processes(nvml: Any, handle: Any) -> tuple[GPUProcess, ...]:
    """Compute and graphics processes, one entry per pid (a CUDA app that also draws is listed twice)."""
    found: dict[int, GPUProcess] = {}
    for kind, read in (
        ("compute", "nvmlDeviceGetComputeRunningProcesses"),
        ("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
    ):
        listed = _optional(nvml, lambda read=read: getattr(nvml, read)(handle)) or ()
        for p in listed:
            pid = int(p.pid)
            if pid not in found:
                used = getattr(p, "usedGpuMemory", None)
                name = _optional(nvml, lambda pid=pid: _text(nvml.nvmlSystemGetProcessName(pid))) or None
                found[pid] = GPUProcess(pid, int(used) if used is not None else None, name, kind)
    return tuple(found.values())


def _optional(nvml: Any, read: Callable[[], _T]) -> _T | None:
    try:
        return read()
    # NVML_ERROR_NOT_SUPPORTED for power on many consumer boards, NO_PERMISSION for other users'
    # processes; AttributeError where the binding predates the call
    except (nvml.NVMLError, AttributeError):
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older bindings return bytes


# --- CPU and RAM ---------------------------------------------------------------------------------


def detect_cpu(root: Path = Path("/")) -> CPUInfo:
    total, available = _memory(root)
    return CPUInfo(cores=_cores(), memory_total=total, memory_available=available, model=_cpu_model(root))


def _cores() -> int:
    # The affinity mask is what this process may actually use (taskset, containers' cpusets).
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _memory(root: Path) -> tuple[int, int]:
    """(total, available) bytes: /proc/meminfo, else sysconf; then capped by a container's cgroup limit."""
    info = read_proc_sizes(root / "proc/meminfo")
    try:
        total, available = info["MemTotal"], info["MemAvailable"]
    except KeyError:
        total, available = _sysconf_memory()
    # /proc/meminfo shows the host's RAM even inside a container; sizing by it would get us OOM-killed.
    limit, usage = _cgroup_memory(root)
    if limit is not None:
        total, available = min(total, limit), max(0, min(available, limit - (usage or 0)))
    return total, available


def _sysconf_memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0
    try:
        return total, page * os.sysconf("SC_AVPHYS_PAGES")  # free pages only: an underestimate, which is safe
    except (ValueError, OSError):
        return total, total // 2


def _cgroup_memory(root: Path) -> tuple[int | None, int | None]:
    for limit_file, usage_file in (
        ("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.current"),  # cgroup v2
        ("sys/fs/cgroup/memory/memory.limit_in_bytes", "sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        limit = _read_int(root / limit_file)  # "max" (v2) or a huge number (v1) both mean unlimited
        if limit is not None:
            return limit, _read_int(root / usage_file)
    return None, None


def _cpu_model(root: Path) -> str:
    return _read_key_values(root / "proc/cpuinfo").get("model name", "")


def _read_key_values(path: Path) -> dict[str, str]:
    """``key : value`` lines (meminfo, cpuinfo); the first occurrence of a key wins."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    result: dict[str, str] = {}
    for key, value in pairs:
        result.setdefault(key.strip(), value.strip())
    return result


def read_proc_sizes(path: Path) -> dict[str, int]:
    """The ``Key: <n> kB`` lines of a /proc file (meminfo, <pid>/status, smaps_rollup), in bytes."""
    sizes = {}
    for key, value in _read_key_values(path).items():
        number = value.split()
        if number and number[0].isdigit():
            sizes[key] = int(number[0]) * 1024  # "kB" there means KiB
    return sizes


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
