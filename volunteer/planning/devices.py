"""Which devices a volunteer may serve on, as values: ``Device``, and the choice among them.

A plan names its device by NVML index ("cuda:1" is the GPU NVML lists second, in PCI bus order), not
by torch's index: NVML sees every GPU before torch is imported, while torch numbers only the GPUs
``CUDA_VISIBLE_DEVICES`` leaves it, in its own order. ``Device`` is that NVML-numbered name; it is
turned into torch's ``cuda:N`` only at the edge, by ``torch_device``, just before serving or measuring.

The choice (``pick_device`` for one device, ``pick_devices`` for every device to serve on, and
``serving_devices``, which leaves out the GPUs torch cannot see) is policy over a detected
``HardwareProfile``; detecting what the machine and torch have stays in ``host.hardware``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic_core import core_schema

from volunteer.host.hardware import (
    GPUInfo,
    HardwareProfile,
    bare_uuid,
    match_torch_devices,
)

ALL_GPUS = (None, "auto", "cuda")  # --device values that mean "every GPU there is"


@dataclass(frozen=True, order=True)
class Device:
    """The CPU, or one GPU by its NVML index; written "cpu" or "cuda:N" in JSON, flags and messages."""

    kind: Literal["cpu", "cuda"]
    index: int | None = None  # NVML index of a GPU; None for the CPU

    def __post_init__(self) -> None:
        cpu = self.kind == "cpu" and self.index is None
        gpu = self.kind == "cuda" and type(self.index) is int and self.index >= 0
        if not (cpu or gpu):
            raise ValueError(f"a device is cpu or cuda:N with N >= 0, got kind={self.kind!r} index={self.index!r}")

    @classmethod
    def parse(cls, text: str) -> Device:
        """``cpu`` or ``cuda:N``; anything else (``cuda`` alone too: it names no one GPU) is a ValueError."""
        if text == "cpu":
            return CPU
        index = text.removeprefix("cuda:") if isinstance(text, str) else ""
        if index != text and index.isdigit() and index.isascii():
            return cls("cuda", int(index))
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {text!r}")

    @classmethod
    def gpu(cls, gpu: GPUInfo) -> Device:
        return cls("cuda", gpu.index)

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        # plans cross processes as JSON: a device is its string there, as it always was
        return core_schema.no_info_plain_validator_function(
            lambda value: value if isinstance(value, Device) else cls.parse(value),
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )


CPU = Device("cpu")


def find_gpu(hardware: HardwareProfile, device: Device) -> GPUInfo | None:
    """The GPU a device names, None for the CPU or a GPU this machine lacks."""
    return next((g for g in hardware.gpus if device.is_gpu and g.index == device.index), None)


# --- one device, or every device to serve on -----------------------------------------------------


def pick_device(hardware: HardwareProfile, requested: str | Device | None) -> Device:
    """``None``/``auto``/``cuda`` -> the GPU with most free memory (``cuda`` requires one), else ``cpu``."""
    if requested in (None, "auto", "cuda"):
        if hardware.gpus:
            return Device.gpu(max(hardware.gpus, key=lambda g: (g.memory_free, -g.index)))
        if requested == "cuda":
            raise ValueError(f"device cuda requested but no GPU was found ({hardware.nvml_error or 'none listed'})")
        return CPU
    device = requested if isinstance(requested, Device) else Device.parse(requested)
    if device.is_gpu and find_gpu(hardware, device) is None:
        found = ", ".join(str(Device.gpu(g)) for g in hardware.gpus) or "none"
        raise ValueError(f"device {device} requested but the GPUs found are: {found}")
    return device


def pick_devices(hardware: HardwareProfile, device: str | None = None, gpus: str | None = None) -> tuple[Device, ...]:
    """The devices to serve on: ``--gpus 0,2`` (indices or UUIDs, in that order), else ``--device``:
    ``cpu``, ``cuda:N``, or ``cuda``/``auto``/unset for every GPU (most free memory first), else the CPU."""
    if gpus is not None:
        if device not in ALL_GPUS:
            raise ValueError(f"--gpus {gpus} and --device {device} both choose devices: give only one")
        return tuple(Device.gpu(g) for g in select_gpus(hardware, gpus))
    if device in ALL_GPUS and hardware.gpus:
        return tuple(Device.gpu(g) for g in sorted(hardware.gpus, key=lambda g: (-g.memory_free, g.index)))
    return (pick_device(hardware, device),)


def choose_devices(hardware: HardwareProfile, device: str | None = None, gpus: str | None = None,
                   cuda: Any | None = None) -> tuple[tuple[Device, ...], tuple[str, ...]]:
    """``pick_devices``, less the GPUs torch cannot see when the choice was the default one (not
    ``--gpus``, ``--device cuda`` or ``cuda:N``); returns the devices and the notes on those left out.
    ``cuda`` is ``torch.cuda``'s test seam."""
    devices = pick_devices(hardware, device, gpus)
    if gpus is None and device in (None, "auto"):
        return keep_visible(hardware, devices, cuda)
    return devices, ()


def keep_visible(hardware: HardwareProfile, devices: tuple[Device, ...], cuda: Any | None = None
                 ) -> tuple[tuple[Device, ...], tuple[str, ...]]:
    """The devices torch can use, and why each GPU it cannot see is left out (NVML lists every GPU;
    torch sees none with a CPU-only build, and only some under ``CUDA_VISIBLE_DEVICES``). With no GPU
    left, the CPU serves. For the default choice only: a GPU the owner named must fail loudly."""
    visible = match_torch_devices(hardware, cuda)
    hidden = {d: gpu for d in devices if (gpu := find_gpu(hardware, d)) is not None and gpu.uuid not in visible}
    kept = tuple(d for d in devices if d not in hidden)
    notes = tuple(f"{d} ({gpu.name}) serves nothing: torch cannot see it (a CPU-only torch build, or "
                  "CUDA_VISIBLE_DEVICES)" for d, gpu in hidden.items())
    return (kept or (CPU,)), notes


def select_gpus(profile: HardwareProfile, spec: str | Sequence[str | int]) -> tuple[GPUInfo, ...]:
    """The GPUs a ``--gpus 0,2`` option names, in the order given.

    Each item is an NVML index or a UUID; a UUID prefix is enough when only one GPU starts with it, as
    with ``CUDA_VISIBLE_DEVICES``. Unknown, ambiguous or repeated items raise a one-line ValueError.
    """
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    if not items or not all(items):
        raise ValueError(f"--gpus {spec!r}: give GPU indices or UUIDs separated by commas, e.g. 0,2")
    if not profile.gpus:
        raise ValueError(f"--gpus {spec!r}: no GPU was found ({profile.nvml_error or 'none listed'})")
    chosen: list[GPUInfo] = []
    for item in items:
        gpu = _find_gpu_item(profile.gpus, item)
        if any(g.index == gpu.index for g in chosen):
            raise ValueError(f"--gpus {spec!r}: GPU {gpu.index} ({gpu.uuid}) is listed twice")
        chosen.append(gpu)
    return tuple(chosen)


def _find_gpu_item(gpus: tuple[GPUInfo, ...], item: str) -> GPUInfo:
    if item.isdigit():
        matches = [g for g in gpus if g.index == int(item)]
    else:
        matches = [g for g in gpus if bare_uuid(g.uuid).startswith(bare_uuid(item))]
    if len(matches) == 1:
        return matches[0]
    found = ", ".join(f"{g.index} ({g.uuid}, {g.name})" for g in gpus)
    problem = "matches several GPUs" if matches else "is not a GPU of this machine"
    raise ValueError(f"--gpus: {item!r} {problem}; the GPUs found are: {found}")


# --- from a plan's device to torch's -------------------------------------------------------------


def torch_device(profile: HardwareProfile, device: Device, cuda: Any | None = None) -> str:
    """The torch device string for a plan's device (its index is NVML's); the CPU stays ``cpu``."""
    if not device.is_gpu:
        return "cpu"
    gpu = find_gpu(profile, device)
    index = match_torch_devices(profile, cuda).get(gpu.uuid) if gpu is not None else None
    if index is None:
        raise ValueError(f"{device} is not visible to torch (CUDA_VISIBLE_DEVICES, or a CPU-only torch build?)")
    return f"cuda:{index}"  # torch's numbering: the one place a torch device string is built


def device_name(profile: HardwareProfile, device: Device) -> str:
    """What the throughput cache calls a device: the GPU's model, or the CPU's model and usable cores."""
    if device.is_gpu:
        gpu = find_gpu(profile, device)
        if gpu is None:
            raise ValueError(f"device {device} is not a GPU of this machine")
        return gpu.name
    return f"{profile.cpu.model or 'unknown CPU'} ({profile.cpu.cores} cores)"


@dataclass(frozen=True)
class ServingDevices:
    """The devices chosen to serve on, why others were left out, and (once known) torch's name for each."""

    devices: tuple[Device, ...]
    left_out: tuple[str, ...] = ()
    # plan device -> torch device; None until ``for_torch`` (``volunteer hardware`` maps only to measure)
    torch: Mapping[Device, str] | None = field(default=None, compare=False, hash=False)

    def for_torch(self, hardware: HardwareProfile, cuda: Any | None = None) -> ServingDevices:
        """With torch's device for each, found now: a GPU torch cannot see fails here, before anything starts."""
        return replace(self, torch={d: torch_device(hardware, d, cuda) for d in self.devices})

    def torch_device(self, hardware: HardwareProfile, device: Device) -> str:
        return self.torch[device] if self.torch is not None else torch_device(hardware, device)


def serving_devices(hardware: HardwareProfile, device: str | None = None, gpus: str | None = None,
                    cuda: Any | None = None) -> ServingDevices:
    """``choose_devices`` as one value: what ``--device`` and ``--gpus`` choose on this machine."""
    return ServingDevices(*choose_devices(hardware, device, gpus, cuda))
