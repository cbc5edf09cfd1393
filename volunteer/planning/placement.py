"""Which devices a volunteer serves on, and which experts each one holds.

A machine with several GPUs serves on all of them, or on those ``--gpus`` names. Each GPU gets a plan
of its own (``sizing.plan_experts``: its own memory budget, batch size and measured throughput) over
the uids that the GPUs planned before it left, so one volunteer never holds a uid twice; the biggest
GPU is planned first, so it takes the most-needed uids. At run time each device gets its own hivemind
``Runtime`` thread (``serving.DeviceRuntimes``) behind the volunteer's one DHT peer, so the GPUs
compute in parallel while the swarm sees one volunteer, one address and one set of stats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from volunteer.core.manifest import Manifest
from volunteer.host.hardware import HardwareProfile, match_torch_devices, select_gpus
from volunteer.planning.sizing import Plan, SizingError, pick_device, plan_experts

ALL_GPUS = (None, "auto", "cuda")  # --device values that mean "every GPU there is"


@dataclass(frozen=True)
class Placement:
    """One plan per serving device, biggest first, and why any selected device serves nothing."""

    plans: tuple[Plan, ...]
    left_out: tuple[str, ...] = ()

    @property
    def uids(self) -> tuple[str, ...]:
        return tuple(uid for plan in self.plans for uid in plan.uids)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(plan.device for plan in self.plans)

    @property
    def device(self) -> str:
        """All serving devices in one label, as status lines and the swarm's records show them."""
        return ",".join(self.devices)

    def to_dict(self) -> dict[str, object]:
        return dict(plans=[plan.to_dict() for plan in self.plans], left_out=list(self.left_out))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Placement:
        return cls(tuple(Plan.from_dict(p) for p in data["plans"]), tuple(data.get("left_out", ())))  # type: ignore


def pick_devices(hardware: HardwareProfile, device: str | None = None, gpus: str | None = None) -> tuple[str, ...]:
    """The devices to serve on: ``--gpus 0,2`` (indices or UUIDs, in that order), else ``--device``:
    ``cpu``, ``cuda:N``, or ``cuda``/``auto``/unset for every GPU (most free memory first), else the CPU."""
    if gpus is not None:
        if device not in ALL_GPUS:
            raise ValueError(f"--gpus {gpus} and --device {device} both choose devices: give only one")
        return tuple(f"cuda:{g.index}" for g in select_gpus(hardware, gpus))
    if device in ALL_GPUS and hardware.gpus:
        return tuple(f"cuda:{g.index}" for g in sorted(hardware.gpus, key=lambda g: (-g.memory_free, g.index)))
    return (pick_device(hardware, device),)


def choose_devices(hardware: HardwareProfile, device: str | None = None, gpus: str | None = None,
                   cuda: Any | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``pick_devices``, less the GPUs torch cannot see when the choice was the default one (not
    ``--gpus``, ``--device cuda`` or ``cuda:N``); returns the devices and the notes on those left out.
    ``cuda`` is ``torch.cuda``'s test seam."""
    devices = pick_devices(hardware, device, gpus)
    if gpus is None and device in (None, "auto"):
        return keep_visible(hardware, devices, cuda)
    return devices, ()


def keep_visible(hardware: HardwareProfile, devices: tuple[str, ...], cuda: Any | None = None
                 ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The devices torch can use, and why each GPU it cannot see is left out (NVML lists every GPU;
    torch sees none with a CPU-only build, and only some under ``CUDA_VISIBLE_DEVICES``). With no GPU
    left, the CPU serves. For the default choice only: a GPU the owner named must fail loudly."""
    visible = match_torch_devices(hardware, cuda)
    gpus = {f"cuda:{g.index}": g for g in hardware.gpus}
    kept = tuple(d for d in devices if d not in gpus or gpus[d].uuid in visible)
    notes = tuple(f"{d} ({gpus[d].name}) serves nothing: torch cannot see it (a CPU-only torch build, or "
                  "CUDA_VISIBLE_DEVICES)" for d in devices if d not in kept)
    return (kept or ("cpu",)), notes


def place_experts(
    hardware: HardwareProfile,
    manifest: Manifest,
    server_counts: Mapping[str, int],
    *,
    devices: tuple[str, ...],
    max_memory: float | None = None,
    max_experts: int | None = None,
    seed: int = 0,
    served_throughput: Mapping[str, float] | None = None,
) -> Placement:
    """Plan each device in turn over the uids the ones before it did not take.

    ``max_memory`` applies to each device (a fraction of its free memory, or bytes on each);
    ``max_experts`` caps the volunteer's total. A device where not even one expert fits, or that finds
    nothing left to serve, is left out with the reason; if every device is, the first reason is raised.
    """
    plans: list[Plan] = []
    left_out: list[str] = []
    failures: list[SizingError] = []
    taken: set[str] = set()
    every_uid = set(manifest.all_uids())
    for device in devices:
        left = None if max_experts is None else max_experts - len(taken)
        if left is not None and left < 1:
            left_out.append(f"{device} serves nothing: the {max_experts} experts of max_experts are placed")
            continue
        if taken >= every_uid:
            left_out.append(f"{device} serves nothing: every uid of {manifest.name!r} is placed already")
            continue
        try:
            plan = plan_experts(hardware, manifest, server_counts, device=device, max_memory=max_memory,
                                max_experts=left, seed=seed, served_throughput=served_throughput, exclude=taken)
        except SizingError as e:
            if len(devices) == 1:
                raise
            failures.append(e)
            left_out.append(f"{device} serves nothing: {e}")
            continue
        plans.append(plan)
        taken.update(plan.uids)
    if not plans:
        raise failures[0] if failures else SizingError("no device can serve: " + "; ".join(left_out))
    return Placement(tuple(plans), tuple(left_out))
