"""Hardware detection against a fake NVML module and fake /proc, /sys trees; no GPU needed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from volunteer.hardware import CPUInfo, GPUInfo, HardwareProfile, detect_cpu, detect_hardware, gpu_telemetry

GiB = 2**30


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - the name pynvml gives it
    pass


class FakeNVML:
    """The subset of pynvml that detection calls, over a list of GPU dicts; ``fail`` names calls that raise."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[dict[str, Any]], fail: tuple[str, ...] = (), init_error: Exception | None = None):
        self.gpus, self.fail, self.init_error = gpus, fail, init_error
        self.initialized = False

    def _call(self, name: str, handle: int, value: Any) -> Any:
        if name in self.fail:
            raise NVMLError("Not Supported")
        return value

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self._call("name", h, self.gpus[h]["name"])

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._call("uuid", h, self.gpus[h]["uuid"])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        g = self.gpus[h]
        return self._call("memory", h, SimpleNamespace(total=g["total"], free=g["free"], used=g["total"] - g["free"]))

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return self._call("utilization", h, SimpleNamespace(gpu=self.gpus[h]["util"], memory=0))

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._call("temperature", h, self.gpus[h]["temp"])

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._call("power", h, self.gpus[h]["milliwatts"])

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self._call("capability", h, self.gpus[h]["cc"])


TWO_GPUS = [
    dict(name="NVIDIA GeForce RTX 3060", uuid="GPU-aaaa", total=12 * GiB, free=11 * GiB, util=3, temp=41,
         milliwatts=25_500, cc=(8, 6)),
    dict(name=b"NVIDIA A100-SXM4-80GB", uuid=b"GPU-bbbb", total=80 * GiB, free=79 * GiB, util=97, temp=67,
         milliwatts=301_000, cc=(8, 0)),
]


def test_two_gpus_are_read_with_all_fields() -> None:
    nvml = FakeNVML(TWO_GPUS)
    profile = detect_hardware(nvml)  # type: ignore[arg-type]
    assert profile.nvml_error is None
    assert profile.gpus == (
        GPUInfo(0, "NVIDIA GeForce RTX 3060", "GPU-aaaa", 12 * GiB, 11 * GiB, 3.0, 41.0, 25.5, (8, 6)),
        GPUInfo(1, "NVIDIA A100-SXM4-80GB", "GPU-bbbb", 80 * GiB, 79 * GiB, 97.0, 67.0, 301.0, (8, 0)),
    )
    assert not nvml.initialized, "NVML must be shut down after reading"
    assert gpu_telemetry(nvml) == profile.gpus  # type: ignore[arg-type]


def test_failing_init_gives_a_cpu_profile_with_the_reason() -> None:
    profile = detect_hardware(FakeNVML(TWO_GPUS, init_error=NVMLError("Driver Not Loaded")))  # type: ignore[arg-type]
    assert profile.gpus == ()
    assert profile.nvml_error == "NVML failed: NVMLError: Driver Not Loaded"
    assert profile.cpu.cores >= 1


def test_missing_library_names_the_library() -> None:
    nvml = FakeNVML(TWO_GPUS, init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    profile = detect_hardware(nvml)  # type: ignore[arg-type]
    assert profile.gpus == () and "libnvidia-ml.so.1" in (profile.nvml_error or "")
    assert gpu_telemetry(nvml) == ()  # type: ignore[arg-type]


def test_unsupported_sensors_become_none_only_for_that_field() -> None:
    profile = detect_hardware(FakeNVML(TWO_GPUS, fail=("power", "temperature")))  # type: ignore[arg-type]
    assert [g.power_watts for g in profile.gpus] == [None, None]
    assert [g.temperature for g in profile.gpus] == [None, None]
    assert profile.gpus[1].memory_free == 79 * GiB and profile.gpus[1].utilization == 97.0
    assert profile.gpus[1].compute_capability == (8, 0) and profile.nvml_error is None


def test_failing_required_field_falls_back_to_cpu() -> None:
    profile = detect_hardware(FakeNVML(TWO_GPUS, fail=("memory",)))  # type: ignore[arg-type]
    assert profile.gpus == () and profile.nvml_error == "NVML failed: NVMLError: Not Supported"


def test_no_gpus_says_so() -> None:
    profile = detect_hardware(FakeNVML([]))  # type: ignore[arg-type]
    assert profile.gpus == () and profile.nvml_error == "NVML found no NVIDIA GPU"


def test_real_detection_on_this_gpu_less_machine() -> None:
    profile = detect_hardware()
    assert profile.cpu.cores >= 1
    assert profile.cpu.memory_total > 0 and 0 < profile.cpu.memory_available <= profile.cpu.memory_total
    if not profile.gpus:  # the CI and development machines have no NVIDIA driver
        assert profile.nvml_error


def _fake_root(tmp: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    return tmp


MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n"
CPUINFO = "processor\t: 0\nmodel name\t: Fake CPU @ 3.0GHz\n\nprocessor\t: 1\nmodel name\t: Fake CPU @ 3.0GHz\n"


def test_meminfo_and_cpuinfo_are_parsed(tmp_path: Path) -> None:
    cpu = detect_cpu(_fake_root(tmp_path, {"proc/meminfo": MEMINFO, "proc/cpuinfo": CPUINFO}))
    assert (cpu.memory_total, cpu.memory_available) == (16384000 * 1024, 8192000 * 1024)
    assert cpu.model == "Fake CPU @ 3.0GHz"


@pytest.mark.parametrize(
    "limit_file,usage_file",
    [
        ("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.current"),
        ("sys/fs/cgroup/memory/memory.limit_in_bytes", "sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ],
)
def test_a_container_memory_limit_caps_the_host_ram(tmp_path: Path, limit_file: str, usage_file: str) -> None:
    root = _fake_root(tmp_path, {"proc/meminfo": MEMINFO, limit_file: str(4 * GiB), usage_file: str(1 * GiB)})
    cpu = detect_cpu(root)
    assert (cpu.memory_total, cpu.memory_available) == (4 * GiB, 3 * GiB)


def test_unlimited_cgroup_and_missing_proc_fall_back(tmp_path: Path) -> None:
    cpu = detect_cpu(_fake_root(tmp_path, {"proc/meminfo": MEMINFO, "sys/fs/cgroup/memory.max": "max\n"}))
    assert cpu.memory_total == 16384000 * 1024
    bare = detect_cpu(tmp_path / "nothing")  # no /proc at all: sysconf
    assert bare.memory_total > 0 and bare.model == ""


def test_profile_round_trips_through_json() -> None:
    profile = HardwareProfile(
        CPUInfo(8, 32 * GiB, 20 * GiB, "Fake CPU"),
        detect_hardware(FakeNVML(TWO_GPUS, fail=("power",))).gpus,  # type: ignore[arg-type]
        None,
    )
    assert HardwareProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    cpu_only = HardwareProfile(CPUInfo(1, GiB, GiB), (), "NVML not found")
    assert HardwareProfile.from_dict(json.loads(json.dumps(cpu_only.to_dict()))) == cpu_only
