"""Hardware detection against a fake NVML module and fake /proc, /sys trees; no GPU needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import CUuuid, FakeCuda, FakeNVML, NVMLError, NVMLError_LibraryNotFound
from volunteer.host.hardware import (
    CPUInfo,
    GPUInfo,
    GPUProcess,
    HardwareProfile,
    detect_cpu,
    detect_hardware,
    gpu_telemetry,
    match_torch_devices,
)
from volunteer.planning.devices import CPU, Device, select_gpus, torch_device

GiB = 2**30


TWO_GPUS = [
    {
        "name": "NVIDIA GeForce RTX 3060", "uuid": "GPU-aaaa", "total": 12 * GiB, "free": 11 * GiB, "util": 3,
        "temp": 41, "milliwatts": 25_500, "cc": (8, 6),
        # a desktop: Xorg draws on it, a CUDA app also draws (listed twice), and another user's job
        "graphics": [{"pid": 1200, "usedGpuMemory": 200 * 2**20}, {"pid": 4242, "usedGpuMemory": GiB}],
        "compute": [{"pid": 4242, "usedGpuMemory": GiB}, {"pid": 777, "usedGpuMemory": None}],
    },
    {
        "name": b"NVIDIA A100-SXM4-80GB", "uuid": b"GPU-bbbb", "total": 80 * GiB, "free": 79 * GiB, "util": 97,
        "temp": 67, "milliwatts": 301_000, "cc": (8, 0),
    },
]
NAMES: dict[int, str | bytes] = {1200: "/usr/lib/xorg/Xorg", 4242: b"python"}  # 777: another user's, unreadable

RTX_PROCESSES = (
    GPUProcess(4242, GiB, "python", "compute"),
    GPUProcess(777, None, None, "compute"),
    GPUProcess(1200, 200 * 2**20, "/usr/lib/xorg/Xorg", "graphics"),
)


def test_two_gpus_are_read_with_all_fields() -> None:
    nvml = FakeNVML(TWO_GPUS, names=NAMES)
    profile = detect_hardware(nvml)  # type: ignore[arg-type]
    assert profile.nvml_error is None
    assert profile.gpus == (
        GPUInfo(0, "NVIDIA GeForce RTX 3060", "GPU-aaaa", 12 * GiB, 11 * GiB, 3.0, 41.0, 25.5, (8, 6), RTX_PROCESSES),
        GPUInfo(1, "NVIDIA A100-SXM4-80GB", "GPU-bbbb", 80 * GiB, 79 * GiB, 97.0, 67.0, 301.0, (8, 0)),
    )
    assert (profile.driver_version, profile.cuda_driver_version) == ("550.54.15", "12.4")
    assert not nvml.initialized, "NVML must be shut down after reading"
    assert gpu_telemetry(nvml) == profile.gpus  # type: ignore[arg-type]


def test_unsupported_process_queries_leave_the_other_kind() -> None:
    # many GeForce boards under older drivers answer NOT_SUPPORTED for one of the two process lists
    profile = detect_hardware(FakeNVML(TWO_GPUS, fail=("graphics",), names=NAMES))  # type: ignore[arg-type]
    assert profile.gpus[0].processes == RTX_PROCESSES[:2]
    both = detect_hardware(FakeNVML(TWO_GPUS, fail=("graphics", "compute")))  # type: ignore[arg-type]
    assert [g.processes for g in both.gpus] == [(), ()] and both.nvml_error is None


def test_unsupported_driver_queries_become_none() -> None:
    profile = detect_hardware(FakeNVML(TWO_GPUS, fail=("driver", "cuda")))  # type: ignore[arg-type]
    assert len(profile.gpus) == 2 and profile.driver_version is None and profile.cuda_driver_version is None


class OldBindingNVML(FakeNVML):
    """A binding that predates the process and driver queries: the attributes do not exist."""

    def __getattribute__(self, name: str) -> Any:
        if name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses",
                    "nvmlSystemGetCudaDriverVersion"):
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_an_old_binding_still_reads_the_gpus() -> None:
    profile = detect_hardware(OldBindingNVML(TWO_GPUS))  # type: ignore[arg-type]
    assert [g.uuid for g in profile.gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert all(g.processes == () for g in profile.gpus)
    assert profile.driver_version == "550.54.15" and profile.cuda_driver_version is None


def test_failing_init_gives_a_cpu_profile_with_the_reason() -> None:
    profile = detect_hardware(FakeNVML(TWO_GPUS, init_error=NVMLError("Driver Not Loaded")))  # type: ignore[arg-type]
    assert profile.gpus == () and profile.driver_version is None
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
    assert profile.gpus == () and profile.nvml_error == "NVML failed: NVMLError_NotSupported: Not Supported"


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
        detect_hardware(FakeNVML(TWO_GPUS, fail=("power",), names=NAMES)).gpus,  # type: ignore[arg-type]
        None, "550.54.15", "12.4",
    )
    assert profile.gpus[0].processes
    assert HardwareProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    cpu_only = HardwareProfile(CPUInfo(1, GiB, GiB), (), "NVML not found")
    assert HardwareProfile.from_dict(json.loads(json.dumps(cpu_only.to_dict()))) == cpu_only


def test_a_profile_saved_before_processes_and_drivers_still_loads() -> None:
    old = {"cpu": CPUInfo(2, GiB, GiB).to_dict(), "nvml_error": None,
           "gpus": [{"index": 0, "name": "old", "uuid": "GPU-0", "memory_total": GiB, "memory_free": GiB,
                     "utilization": None, "temperature": None, "power_watts": None, "compute_capability": [7, 5]}]}
    profile = HardwareProfile.from_dict(old)
    assert profile.gpus[0].processes == () and profile.gpus[0].compute_capability == (7, 5)
    assert profile.driver_version is None


# --- choosing GPUs (planning.devices) and finding them in torch -----------------------------------------------------


def gpu(index: int, uuid: str, name: str = "GPU") -> GPUInfo:
    return GPUInfo(index, name, uuid, 24 * GiB, 20 * GiB)


THREE = HardwareProfile(
    CPUInfo(16, 64 * GiB, 60 * GiB),
    (gpu(0, "GPU-0a1b2c3d-0000-0000-0000-000000000000"), gpu(1, "GPU-0a1b9999-0000-0000-0000-000000000000"),
     gpu(2, "GPU-ffee0000-0000-0000-0000-000000000000")),
)
CPU_ONLY = HardwareProfile(CPUInfo(2, 4 * GiB, 3 * GiB), (), "NVML not found: libnvidia-ml.so.1")


@pytest.mark.parametrize(
    "spec, indices",
    [
        ("0,2", [0, 2]),
        ("2, 0", [2, 0]),  # the order given is kept: the first is the one planned first
        ("GPU-ffee0000-0000-0000-0000-000000000000", [2]),
        ("GPU-ffee,1", [2, 1]),  # a unique prefix is enough, as in CUDA_VISIBLE_DEVICES
        ("ffee0000", [2]),  # without NVML's "GPU-" prefix, as torch prints it
        ([1, "GPU-0a1b2"], [1, 0]),
    ],
)
def test_select_gpus(spec: Any, indices: list[int]) -> None:
    assert [g.index for g in select_gpus(THREE, spec)] == indices


@pytest.mark.parametrize(
    "profile, spec, message",
    [
        (THREE, "3", r"'3' is not a GPU of this machine; the GPUs found are: 0 \(GPU-0a1b2c3d"),
        (THREE, "GPU-1234", "'GPU-1234' is not a GPU of this machine"),
        (THREE, "GPU-0a1b", "'GPU-0a1b' matches several GPUs"),
        (THREE, "0,GPU-0a1b2", "GPU 0 .* is listed twice"),
        (THREE, "0,,1", "give GPU indices or UUIDs"),
        (THREE, "", "give GPU indices or UUIDs"),
        (CPU_ONLY, "0", r"no GPU was found \(NVML not found"),
    ],
)
def test_select_gpus_refuses_what_it_cannot_find(profile: HardwareProfile, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        select_gpus(profile, spec)
    assert "\n" not in str(info.value)


def test_torch_devices_are_matched_by_uuid() -> None:
    # CUDA_VISIBLE_DEVICES=2,0: torch sees NVML's 2 as cuda:0 and NVML's 0 as cuda:1; torch drops "GPU-"
    cuda = FakeCuda([CUuuid("ffee0000-0000-0000-0000-000000000000"), "0A1B2C3D-0000-0000-0000-000000000000"])
    assert match_torch_devices(THREE, cuda) == {THREE.gpus[2].uuid: 0, THREE.gpus[0].uuid: 1}
    assert torch_device(THREE, Device("cuda", 2), cuda) == "cuda:0" and torch_device(THREE, CPU, cuda) == "cpu"
    with pytest.raises(ValueError, match="cuda:1 is not visible to torch"):
        torch_device(THREE, Device("cuda", 1), cuda)


def test_an_old_torch_without_uuids_matches_nothing() -> None:
    assert match_torch_devices(THREE, FakeCuda([None, None])) == {}


def test_no_gpu_means_cuda_is_never_asked() -> None:
    cuda = FakeCuda(["ffee0000-0000-0000-0000-000000000000"])
    assert match_torch_devices(CPU_ONLY, cuda) == {} and cuda.calls == []
    unavailable = FakeCuda(["ffee0000-0000-0000-0000-000000000000"], available=False)
    assert match_torch_devices(THREE, unavailable) == {}


def test_match_on_this_machine_with_the_real_torch() -> None:
    # a CPU-only torch (CI, development) says CUDA is unavailable, whatever NVML claimed
    import torch

    expected = {} if not torch.cuda.is_available() else match_torch_devices(THREE)
    assert match_torch_devices(THREE) == expected
    assert match_torch_devices(CPU_ONLY) == {}


def test_telemetry_rescans_for_our_processes_only_every_members_period(monkeypatch):
    """Between full scans only the processes found last are looked at again (an idle volunteer's CPU
    went to looking at every process of a shared machine every 2 s). Real processes, in a group of
    their own."""
    import os
    import signal
    import subprocess

    from volunteer.host import telemetry

    first = subprocess.Popen(["sleep", "60"], process_group=0)
    group = first.pid
    joined = []

    def join_group() -> subprocess.Popen:
        child = subprocess.Popen(["sleep", "60"], process_group=group)
        joined.append(child)
        return child

    try:
        second = join_group()
        now = [1000.0]
        monkeypatch.setattr(telemetry.time, "monotonic", lambda: now[0])
        reader = telemetry.TelemetryReader(groups=(group,), with_gpus=False)
        assert sorted(p.pid for p in reader._members()) == sorted([first.pid, second.pid])
        third = join_group()  # a new process of ours: seen at the next full scan, not before
        second.kill()  # gone: it holds nothing
        second.wait(timeout=10)
        assert [p.pid for p in reader._members()] == [first.pid]
        now[0] += telemetry.MEMBERS_PERIOD
        assert sorted(p.pid for p in reader._members()) == sorted([first.pid, third.pid])
    finally:
        os.killpg(group, signal.SIGKILL)
        for child in (first, *joined):
            child.wait(timeout=10)
