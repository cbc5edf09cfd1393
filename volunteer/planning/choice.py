"""How many experts, of which uids, one device of this volunteer should serve: ``Plan`` and its making.

The choice of uids follows Petals' ``block_selection.py``: fill the least-served uids first (by the
throughput the swarm serves them with, then by server count), so joining volunteers spread over the
experiment instead of piling onto the same experts (``rebalance.py`` applies the same idea to a
volunteer already serving). How much fits comes from ``memory.py``; what the device really does is
measured in ``throughput.py`` and recorded here, in the plan (``measure_plan``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from volunteer.core.manifest import Manifest
from volunteer.host.hardware import HardwareProfile
from volunteer.planning import devices
from volunteer.planning.devices import Device, pick_device
from volunteer.planning.memory import (
    GPU_HOST_OVERHEAD,
    ExpertCost,
    SizingError,
    budget,
    device_reserve,
    expert_cost,
    size,
)
from volunteer.planning.throughput import TIME_BUDGET_S, Throughput, measure_throughput

CPU_EXPERTS_PER_CORE = 2
CPU_MAX_EXPERTS = 16  # beyond this the TaskPool processes alone thrash a desktop CPU
GPU_MAX_EXPERTS = 64


@dataclass(frozen=True)
class Plan:
    device: Device  # "cpu" or "cuda:N" in JSON (N is the NVML index: devices.torch_device maps it for torch)
    budget_bytes: int  # what the volunteer allows on that device (see memory.memory_budget)
    max_batch_size: int
    uids: tuple[str, ...]  # chosen expert uids, in the order they were picked
    expert_types: tuple[str, ...]  # expert type name of each uid (parallel to uids)
    planned_bytes: int  # the device's fixed reserve plus the sum of expert costs, <= budget_bytes
    reasons: tuple[str, ...]  # human sentences explaining the decision
    dtype: str = "float32"
    reserve_bytes: int = 0  # the device's fixed reserve (CUDA context, or the server process), in planned_bytes
    # plans saved before costs and throughput were recorded lack them; the defaults stand in
    costs: tuple[ExpertCost, ...] = ()  # one per expert type the manifest uses, at max_batch_size
    throughput: tuple[Throughput, ...] = ()  # measured on this device, when asked (measure_plan)

    def to_dict(self) -> dict[str, Any]:
        return PLAN_JSON.dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Plan:
        return PLAN_JSON.validate_python(data)

    @property
    def tensor_bytes(self) -> int:
        """The planned bytes torch's allocator will hold: the costs without reserves and overheads."""
        per_type = {c.expert_type: c.tensors for c in self.costs}
        if not per_type:  # an old plan: all that is known is the total
            return self.planned_bytes - self.reserve_bytes
        return sum(per_type[t] for t in self.expert_types)

    def with_throughput(self, results: Iterable[Throughput]) -> Plan:
        """The plan with measured throughput recorded and explained."""
        results = tuple(results)
        reasons = [
            f"expert type {t.expert_type!r} trains {t.samples_per_second:,.0f} samples/s on {t.device}, "
            f"best at batch {t.best_batch_size}{' (cached)' if t.cached else ''}"
            for t in results
        ]
        return replace(self, throughput=results, reasons=self.reasons + tuple(reasons))


PLAN_JSON = TypeAdapter(Plan)


def plan_experts(
    hardware: HardwareProfile,
    manifest: Manifest,
    server_counts: Mapping[str, int],
    *,
    device: str | Device | None = None,
    max_memory: float | None = None,
    max_experts: int | None = None,
    seed: int = 0,
    served_throughput: Mapping[str, float] | None = None,
    dtype: str = "float32",
    exclude: Collection[str] = (),
    task_pools: bool = True,
) -> Plan:
    """Choose the uids to serve; ``server_counts`` says how many servers each uid has now.

    A negative count marks a uid the caller prefers above all (e.g. one this volunteer trained before,
    whose weights it still holds). Then the uids the swarm serves with the least throughput go first
    (``served_throughput``: uid -> samples/s, from peers' records; a missing uid counts as 0), then
    those with the fewest servers. ``seed`` breaks the remaining ties; volunteers derive it from their
    peer id so that two joining at once do not pick the same uids. ``exclude``: uids never to pick
    (those another device of this volunteer serves). ``device``: as ``devices.pick_device`` takes it.
    """
    device = pick_device(hardware, device)
    room, budget_reason = budget(hardware, device, max_memory)
    reserve, reserve_reason = device_reserve(device)
    batch, costs = _fit_batch(manifest, device, room - reserve, budget_reason, reserve, dtype, task_pools)
    cap, cap_reason = _count_cap(hardware, device, max_experts)
    served = served_throughput or {}
    picks, spent = _choose(manifest, server_counts, served, costs, room - reserve, cap, seed, frozenset(exclude))
    uids = [uid for uid, _ in picks]
    reasons = [budget_reason, reserve_reason]
    if device.is_gpu and hardware.cpu.memory_available < GPU_HOST_OVERHEAD:
        short = f"only {size(hardware.cpu.memory_available)} is available"
        reasons.append(f"warning: a GPU server needs about {size(GPU_HOST_OVERHEAD)} of RAM, {short}")
    if batch < manifest.max_batch_size:
        reasons.append(f"max batch size halved from {manifest.max_batch_size} to {batch} so that one expert fits")
    reasons += [f"expert type {name!r} costs {size(c.total)} at batch {batch}" for name, c in costs.items()]
    reasons += _choice_reasons(manifest, server_counts, uids, cap, cap_reason, room - reserve - spent,
                               frozenset(exclude))
    if served_throughput and uids:
        rates = [finite_rate(served.get(uid, 0.0)) for uid in uids]
        reasons.append(f"least served throughput first: the picked uids had {min(rates):,.0f} to "
                       f"{max(rates):,.0f} samples/s served in the swarm")
    return Plan(
        device=device,
        budget_bytes=room,
        max_batch_size=batch,
        uids=tuple(uids),
        expert_types=tuple(expert_type for _, expert_type in picks),
        planned_bytes=reserve + spent,
        reasons=tuple(reasons),
        dtype=dtype,
        reserve_bytes=reserve,
        costs=tuple(costs.values()),
    )


def _fit_batch(
    manifest: Manifest, device: Device, room: int, budget_reason: str, reserve: int, dtype: str, task_pools: bool
) -> tuple[int, dict[str, ExpertCost]]:
    """Halve the manifest's max batch size until one expert of the cheapest used type fits in ``room``."""
    used = [manifest.expert_type(name) for name in dict.fromkeys(layer.expert_type for layer in manifest.layers)]
    batch = manifest.max_batch_size
    while True:
        costs = {t.name: expert_cost(manifest, t, batch, device.kind, dtype, task_pools=task_pools) for t in used}
        cheapest = min(costs.values(), key=lambda c: c.total)
        if cheapest.total <= room:
            return batch, costs
        if batch == 1:
            raise SizingError(
                f"one {cheapest.expert_type!r} expert needs {size(cheapest.total)} at batch 1 plus "
                f"{size(reserve)} reserved on {device}, {size(cheapest.total + reserve)} in all, "
                f"but the {budget_reason}; raise max_memory or use a bigger device"
            )
        batch //= 2


def _count_cap(hardware: HardwareProfile, device: Device, max_experts: int | None) -> tuple[int, str]:
    if max_experts is not None:
        if isinstance(max_experts, bool) or not isinstance(max_experts, int) or max_experts < 1:
            raise ValueError(f"max_experts must be a positive integer, got {max_experts!r:.40}")
        return max_experts, f"count cap {max_experts} (max_experts)"
    if device.is_gpu:
        return GPU_MAX_EXPERTS, f"count cap {GPU_MAX_EXPERTS} on GPU"
    cores = hardware.cpu.cores
    cap = min(CPU_MAX_EXPERTS, max(1, CPU_EXPERTS_PER_CORE * cores))
    return cap, f"count cap {cap} ({CPU_EXPERTS_PER_CORE} x {cores} cores, at most {CPU_MAX_EXPERTS})"


def _choose(
    manifest: Manifest, counts: Mapping[str, int], served: Mapping[str, float], costs: Mapping[str, ExpertCost],
    room: int, cap: int, seed: int, exclude: frozenset[str] = frozenset(),
) -> tuple[list[tuple[str, str]], int]:
    """Greedy: the fitting uid that is preferred, then least served (throughput, then servers), then
    from the least-picked layer, then in a seeded order.

    Returns (uid, expert type) pairs in pick order and their total cost. All uids of a layer share one
    expert type, hence one cost: each layer's candidates are sorted once and only its head competes,
    so a step costs O(layers), not O(uids).
    """

    def need(uid: str) -> tuple[bool, float, int]:  # smaller = needs this volunteer more
        servers = counts.get(uid, 0)
        return servers >= 0, finite_rate(served.get(uid, 0.0)), servers

    queues = [  # per layer: (need, seeded rank, uid), best first
        sorted((need(uid), _seeded_rank(seed, uid), uid) for uid in layer.uids() if uid not in exclude)
        for layer in manifest.layers
    ]
    layer_cost = [costs[layer.expert_type].total for layer in manifest.layers]
    taken = [0] * len(queues)  # how many of each layer's queue this plan has picked: its head's position
    picked: list[tuple[str, str]] = []
    spent = 0

    def priority(i: int) -> tuple[tuple[bool, float, int], int, bytes]:  # need, least-picked layer, seed
        uid_need, rank, _ = queues[i][taken[i]]
        return uid_need, taken[i], rank

    while len(picked) < cap:
        fitting = [i for i, q in enumerate(queues) if taken[i] < len(q) and layer_cost[i] <= room - spent]
        if not fitting:
            break
        best = min(fitting, key=priority)
        picked.append((queues[best][taken[best]][2], manifest.layers[best].expert_type))
        taken[best] += 1
        spent += layer_cost[best]
    return picked, spent


def finite_rate(value: float) -> float:
    """A samples/s figure from a peer, 0 unless finite and positive."""
    # peers' records are untrusted input: a NaN would make the order depend on the sort's whims
    return float(value) if math.isfinite(value) and value > 0 else 0.0


def _seeded_rank(seed: int, uid: str) -> bytes:
    # A stable hash (not Python's salted hash()) so the order is the same in every process and run,
    # and a uid's rank does not depend on which other uids the manifest lists.
    return hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest()


def _choice_reasons(
    manifest: Manifest, counts: Mapping[str, int], uids: list[str], cap: int, cap_reason: str, left: int,
    exclude: frozenset[str] = frozenset(),
) -> list[str]:
    total = len(manifest.all_uids())
    if len(uids) == total:
        stop = f"every uid of experiment {manifest.name!r}"
    elif exclude and len(uids) == len(set(manifest.all_uids()) - exclude):
        stop = f"every uid its other devices left of experiment {manifest.name!r}"
    elif len(uids) == cap:
        stop = cap_reason
    else:
        stop = f"memory full ({size(left)} left, less than one more expert)"
    # counts <= 0 are unserved: a negative count is how a caller marks a uid it prefers
    unserved = sum(1 for uid in manifest.all_uids() if counts.get(uid, 0) <= 0)
    picked_unserved = sum(1 for uid in uids if counts.get(uid, 0) <= 0)
    if unserved == 0:
        spread = f"all {total} uids already had a server; picked the least served"
    elif picked_unserved == len(uids):
        spread = f"{unserved} uids had no server; picked from those"
    else:
        spread = f"{unserved} uids had no server; picked {picked_unserved} of them first, then the least served"
    return [f"picked {len(uids)} experts: {stop}", spread]


# --- measured on the plan's device ---------------------------------------------------------------


def measure_plan(
    profile: HardwareProfile, manifest: Manifest, plan: Plan, cache_dir: Path, *, remeasure: bool = False,
    time_budget: float = TIME_BUDGET_S, torch_device: str | None = None,
) -> Plan:
    """The plan with its expert types measured on its device (cached), for ``volunteer hardware --plan``.

    ``torch_device``: where to measure, when the caller already mapped the plan's device for torch."""
    results = measure_throughput(
        manifest, cache_dir, device=torch_device or devices.torch_device(profile, plan.device),
        device_name=devices.device_name(profile, plan.device),
        max_batch=plan.max_batch_size, expert_types=_used_types(plan), dtype=plan.dtype,
        remeasure=remeasure, time_budget=time_budget,
    )
    return plan.with_throughput(results)


def _used_types(plan: Plan) -> tuple[str, ...]:
    # in the manifest's order (that of plan.costs) rather than pick order: the report lists them so
    listed = tuple(c.expert_type for c in plan.costs if c.expert_type in plan.expert_types)
    return listed or tuple(dict.fromkeys(plan.expert_types))
