"""Which experts each serving device of a volunteer holds: ``Placement``, and ``plan_volunteer``.

A machine with several GPUs serves on all of them, or on those ``--gpus`` names (``devices.py``). Each
GPU gets a plan of its own (``choice.plan_experts``: its own memory budget, batch size and measured
throughput) over the uids that the GPUs planned before it left, so one volunteer never holds a uid
twice; the biggest GPU is planned first, so it takes the most-needed uids. At run time each device
gets its own hivemind ``Runtime`` thread (``serving.DeviceRuntimes``) behind the volunteer's one DHT
peer, so the GPUs compute in parallel while the swarm sees one volunteer, one address and one set of
stats.

``plan_volunteer`` is the one place a volunteer's placement is made: ``VolunteerNode.start`` calls it
with what it read of the swarm, ``volunteer hardware`` with an empty swarm, so what the command shows
is what a node would serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from volunteer.core.manifest import Manifest
from volunteer.host.hardware import HardwareProfile
from volunteer.planning.choice import Plan, measure_plan, plan_experts
from volunteer.planning.devices import Device, ServingDevices
from volunteer.planning.memory import SizingError


@dataclass(frozen=True)
class Placement:
    """One plan per serving device, biggest first, and why any selected device serves nothing."""

    plans: tuple[Plan, ...]
    left_out: tuple[str, ...] = ()

    @property
    def uids(self) -> tuple[str, ...]:
        return tuple(uid for plan in self.plans for uid in plan.uids)

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(plan.device for plan in self.plans)

    @property
    def device(self) -> str:
        """All serving devices in one label, as status lines and the swarm's records show them."""
        return ",".join(map(str, self.devices))

    def to_dict(self) -> dict[str, Any]:
        return PLACEMENT_JSON.dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Placement:
        return PLACEMENT_JSON.validate_python(data)


PLACEMENT_JSON = TypeAdapter(Placement)


@dataclass(frozen=True)
class SwarmView:
    """What a joined volunteer read of the swarm; the empty default is a machine that has not joined."""

    # servers per uid; a negative count marks a uid to serve first (see choice.plan_experts)
    server_counts: Mapping[str, int] = field(default_factory=dict, hash=False)
    served_throughput: Mapping[str, float] | None = field(default=None, hash=False)  # uid -> samples/s
    seed: int = 0  # breaks ties, so volunteers joining at once spread out


@dataclass(frozen=True)
class Measuring:
    """Measure each plan's throughput on its device (``choice.measure_plan``), cached under ``cache_dir``."""

    cache_dir: Path
    remeasure: bool = False  # ignore the cache


def plan_volunteer(
    hardware: HardwareProfile,
    manifest: Manifest,
    devices: ServingDevices,
    *,
    swarm: SwarmView = SwarmView(),
    max_memory: float | None = None,
    max_experts: int | None = None,
    measuring: Measuring | None = None,
    task_pools: bool = True,
) -> Placement:
    """What this volunteer serves on each of ``devices``: placed, measured if asked, with every note
    on the devices left out (those torch cannot see first). Raises ``SizingError`` if nothing fits."""
    placement = place_experts(
        hardware, manifest, swarm.server_counts, devices=devices.devices, max_memory=max_memory,
        max_experts=max_experts, seed=swarm.seed, served_throughput=swarm.served_throughput, task_pools=task_pools,
    )
    if measuring is not None:
        placement = replace(placement, plans=tuple(
            measure_plan(hardware, manifest, plan, measuring.cache_dir, remeasure=measuring.remeasure,
                         torch_device=devices.torch_device(hardware, plan.device))
            for plan in placement.plans
        ))
    return replace(placement, left_out=devices.left_out + placement.left_out)


def place_experts(
    hardware: HardwareProfile,
    manifest: Manifest,
    server_counts: Mapping[str, int],
    *,
    devices: tuple[Device, ...],
    max_memory: float | None = None,
    max_experts: int | None = None,
    seed: int = 0,
    served_throughput: Mapping[str, float] | None = None,
    task_pools: bool = True,
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
                                max_experts=left, seed=seed, served_throughput=served_throughput, exclude=taken,
                                task_pools=task_pools)
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
