"""What this machine has to lend: CPU cores, RAM and NVIDIA GPUs.

GPUs are read through NVML (``pynvml``) rather than torch, so detection needs no CUDA context and
works before anything heavy is imported. No GPU stack is ever required: any NVML failure yields a
CPU-only profile whose ``nvml_error`` tells the user why no GPU was found. The profile crosses
process boundaries as JSON, hence the explicit ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, TypeVar

_T = TypeVar("_T")


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPUInfo:
        capability = data.get("compute_capability")
        return cls(**{**data, "compute_capability": tuple(capability) if capability is not None else None})


@dataclass(frozen=True)
class CPUInfo:
    cores: int
    memory_total: int  # bytes
    memory_available: int  # bytes
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CPUInfo:
        return cls(**data)


@dataclass(frozen=True)
class HardwareProfile:
    cpu: CPUInfo
    gpus: tuple[GPUInfo, ...] = ()
    nvml_error: str | None = None  # why no GPU was found, shown to the user

    def to_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu.to_dict(), "gpus": [g.to_dict() for g in self.gpus], "nvml_error": self.nvml_error}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        gpus = tuple(GPUInfo.from_dict(g) for g in data.get("gpus", ()))
        return cls(CPUInfo.from_dict(data["cpu"]), gpus, data.get("nvml_error"))


def detect_hardware(nvml: ModuleType | None = None, root: Path = Path("/")) -> HardwareProfile:
    """Read CPU, RAM and GPUs; ``nvml`` and ``root`` (where /proc and /sys live) are test seams."""
    gpus, error = _read_gpus(nvml)
    return HardwareProfile(detect_cpu(root), gpus, error)


def gpu_telemetry(nvml: ModuleType | None = None) -> tuple[GPUInfo, ...]:
    """Re-read the GPUs (free memory, utilization, temperature, power) for dashboards; () without NVML."""
    return _read_gpus(nvml)[0]


# --- GPUs ----------------------------------------------------------------------------------------


def _read_gpus(nvml: ModuleType | Any | None) -> tuple[tuple[GPUInfo, ...], str | None]:
    # NVML is a C library behind ctypes: a missing library, a missing or mismatched driver, or an old
    # binding surface as NVMLError subclasses, OSError, ImportError or AttributeError. A broken GPU
    # stack must degrade to a CPU volunteer, never crash the client, hence the broad except.
    try:
        nvml = nvml if nvml is not None else _import_pynvml()
        nvml.nvmlInit()
    except Exception as e:
        return (), _nvml_reason(e)
    try:
        gpus = tuple(_read_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
    except Exception as e:
        return (), _nvml_reason(e)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass  # nothing useful to do if shutdown fails; the readings are already taken
    return gpus, None if gpus else "NVML found no NVIDIA GPU"


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
    )


def _optional(nvml: Any, read: Callable[[], _T]) -> _T | None:
    try:
        return read()
    except nvml.NVMLError:  # e.g. NVML_ERROR_NOT_SUPPORTED for power on many consumer boards
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
    info = _read_key_values(root / "proc/meminfo")
    try:
        total, available = _kib(info["MemTotal"]), _kib(info["MemAvailable"])
    except (KeyError, ValueError):
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


def _kib(value: str) -> int:
    return int(value.split()[0]) * 1024  # meminfo says "kB" but means KiB


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
