"""How many experts, of which uids, this volunteer should serve, and when to move: pure functions.

The memory model is deliberately simple and errs on the side of safety: every byte an expert can hold
in the plan's dtype (weights, gradients, optimizer state, activations of a full batch) plus a
per-expert and a per-server reserve. The choice of uids follows Petals' ``block_selection.py``: fill
the least-served uids first (by the throughput the swarm serves them with, then by server count), so
joining volunteers spread over the experiment instead of piling onto the same experts
(``rebalance.py`` applies the same idea to a volunteer already serving). What the device really does
(throughput, peak memory against the plan) is measured in ``throughput.py``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from volunteer.core.blocks import BLOCKS, OPTIMIZERS
from volunteer.core.manifest import ExpertType, Manifest, Optimizer
from volunteer.host import hardware
from volunteer.host.hardware import HardwareProfile
from volunteer.planning.throughput import (
    TIME_BUDGET_S,
    Throughput,
    device_name,
    measure_throughput,
)

MiB = 2**20
GiB = 2**30
# fp32 is the default; torch keeps grads and optimizer state in the weights' dtype, so one size fits all
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# hivemind runs two TaskPool processes (forward and backward) per expert on top of the runtime; each
# one's interpreter pages and shared-memory batch buffers cost far more on CPU than the weights do.
CPU_EXPERT_OVERHEAD = 96 * MiB
# On GPU the pools still exist but their buffers live in host RAM; what lands on the device per expert
# is the caching allocator's rounding and fragmentation.
GPU_EXPERT_OVERHEAD = 32 * MiB
# The server process itself on CPU: torch, hivemind, the DHT and its p2pd daemon.
CPU_BASE_OVERHEAD = 512 * MiB
# A GPU server needs this much host RAM for the same processes; it is NOT taken from the GPU budget,
# only reported when the host is short of it.
GPU_HOST_OVERHEAD = 1 * GiB
# The CUDA context, cuBLAS workspaces and kernels live on the GPU outside torch's accounting.
CUDA_CONTEXT_RESERVE = 512 * MiB

DEFAULT_FRACTION = {"cpu": 0.5, "cuda": 0.8}  # leave the volunteer's own work room to breathe
CPU_EXPERTS_PER_CORE = 2
CPU_MAX_EXPERTS = 16  # beyond this the TaskPool processes alone thrash a desktop CPU
GPU_MAX_EXPERTS = 64


class SizingError(ValueError):
    """Not even one expert fits; the message is one line saying what is needed vs the budget."""


@dataclass(frozen=True)
class ExpertCost:
    """Bytes for ONE expert of a manifest expert type at a given batch size and dtype."""

    expert_type: str
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    overhead: int
    batch_size: int = 0
    dtype: str = "float32"

    @property
    def tensors(self) -> int:
        """What torch's allocator holds for it, i.e. what ``torch.cuda.max_memory_allocated`` sees."""
        return self.weights + self.grads + self.optimizer + self.activations

    @property
    def total(self) -> int:
        return self.tensors + self.overhead


def optimizer_states(optimizer: Optimizer) -> int:
    """Parameter-sized tensors the optimizer keeps: Adam 2, SGD 1 with momentum and 0 without."""
    if optimizer.name == "sgd":  # the manifest has no momentum yet and serving builds plain SGD
        return 1 if getattr(optimizer, "momentum", 0) else 0
    return OPTIMIZERS[optimizer.name].states


def expert_cost(
    manifest: Manifest, expert_type: ExpertType, batch_size: int, device_kind: str, dtype: str = "float32"
) -> ExpertCost:
    """``device_kind`` is ``cpu`` or ``cuda`` (``cuda:N`` is accepted too)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    size = DTYPE_BYTES[dtype]
    params = expert_type.num_params(manifest.d_model)
    per_sample = BLOCKS[expert_type.block].activations_per_sample(manifest.d_model, expert_type.d_hidden)
    return ExpertCost(
        expert_type=expert_type.name,
        params=params,
        weights=params * size,
        grads=params * size,
        optimizer=optimizer_states(manifest.optimizer) * params * size,
        # x2: hivemind's backward recomputes the forward pass, so both sets of activations coexist
        activations=per_sample * batch_size * size * 2,
        overhead=GPU_EXPERT_OVERHEAD if _is_gpu(device_kind) else CPU_EXPERT_OVERHEAD,
        batch_size=batch_size,
        dtype=dtype,
    )


@dataclass(frozen=True)
class Plan:
    device: str  # "cpu" or "cuda:N" (N is the NVML index: hardware.torch_device maps it for torch)
    budget_bytes: int  # what the volunteer allows on that device (see memory_budget)
    max_batch_size: int
    uids: tuple[str, ...]  # chosen expert uids, in the order they were picked
    expert_types: tuple[str, ...]  # expert type name of each uid (parallel to uids)
    planned_bytes: int  # the device's fixed reserve plus the sum of expert costs, <= budget_bytes
    reasons: tuple[str, ...]  # human sentences explaining the decision
    dtype: str = "float32"
    reserve_bytes: int = 0  # the device's fixed reserve (CUDA context, or the server process), in planned_bytes
    costs: tuple[ExpertCost, ...] = ()  # one per expert type the manifest uses, at max_batch_size
    throughput: tuple[Throughput, ...] = ()  # measured on this device, when asked (throughput.measure_plan)

    def to_dict(self) -> dict[str, object]:
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        data["costs"] = [{**asdict(c), "total": c.total} for c in self.costs]
        data["throughput"] = [t.to_dict() for t in self.throughput]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Plan:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        # plans saved before costs and throughput were recorded lack them; the defaults stand in
        fields["costs"] = tuple(
            ExpertCost(**{k: v for k, v in c.items() if k != "total"}) for c in data.get("costs", ())  # type: ignore
        )
        fields["throughput"] = tuple(Throughput.from_dict(t) for t in data.get("throughput", ()))  # type: ignore
        return cls(**fields)  # type: ignore[arg-type]

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


# --- device and budget ---------------------------------------------------------------------------


def pick_device(hardware: HardwareProfile, requested: str | None) -> str:
    """``None``/``auto``/``cuda`` -> the GPU with most free memory (``cuda`` requires one), else ``cpu``."""
    if requested == "cpu":
        return "cpu"
    if requested in (None, "auto", "cuda"):
        if hardware.gpus:
            best = max(hardware.gpus, key=lambda g: (g.memory_free, -g.index))
            return f"cuda:{best.index}"
        if requested == "cuda":
            raise ValueError(f"device cuda requested but no GPU was found ({hardware.nvml_error or 'none listed'})")
        return "cpu"
    index = requested.removeprefix("cuda:")
    if requested.startswith("cuda:") and index.isdigit():
        if any(g.index == int(index) for g in hardware.gpus):
            return f"cuda:{int(index)}"
        found = ", ".join(f"cuda:{g.index}" for g in hardware.gpus) or "none"
        raise ValueError(f"device {requested} requested but the GPUs found are: {found}")
    raise ValueError(f"device must be cpu, cuda or cuda:N, got {requested!r}")


def memory_budget(hardware: HardwareProfile, device: str, max_memory: float | None) -> int:
    """Bytes the volunteer may use on ``device``.

    ``None``: a safe default fraction (CPU: 0.5 of available RAM, GPU: 0.8 of free memory); a float in
    (0, 1]: that fraction; a whole number > 1: bytes, capped at what is free or available.
    """
    return _budget(hardware, device, max_memory)[0]


def _budget(hardware: HardwareProfile, device: str, max_memory: float | None) -> tuple[int, str]:
    """The budget and the sentence explaining it."""
    free, where = _free_memory(hardware, device)
    if max_memory is None:
        fraction = DEFAULT_FRACTION["cuda" if _is_gpu(device) else "cpu"]
        return int(fraction * free), f"budget {_size(int(fraction * free))} = {fraction:.0%} of {_size(free)} {where}"
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not math.isfinite(max_memory):
        raise ValueError(f"max_memory must be a fraction in (0, 1] or a number of bytes, got {max_memory!r:.40}")
    if 0 < max_memory <= 1:
        budget = int(max_memory * free)
        return budget, f"budget {_size(budget)} = {max_memory:.0%} of {_size(free)} {where} (max_memory)"
    if max_memory > 1 and float(max_memory).is_integer():
        asked = int(max_memory)
        if asked > free:
            return free, f"budget {_size(free)} = all {where}; max_memory asked for {_size(asked)}"
        return asked, f"budget {_size(asked)} of {_size(free)} {where} (max_memory)"
    raise ValueError(f"max_memory must be a fraction in (0, 1] or a whole number of bytes, got {max_memory!r}")


def _free_memory(hardware: HardwareProfile, device: str) -> tuple[int, str]:
    if device == "cpu":
        return hardware.cpu.memory_available, "available RAM"
    gpu = next((g for g in hardware.gpus if f"cuda:{g.index}" == device), None)
    if gpu is None:
        raise ValueError(f"device {device!r} is not cpu or a GPU of this machine")
    return gpu.memory_free, f"free memory on {device} ({gpu.name})"


# --- the plan ------------------------------------------------------------------------------------


def plan_experts(
    hardware: HardwareProfile,
    manifest: Manifest,
    server_counts: Mapping[str, int],
    *,
    device: str | None = None,
    max_memory: float | None = None,
    max_experts: int | None = None,
    seed: int = 0,
    served_throughput: Mapping[str, float] | None = None,
    dtype: str = "float32",
    exclude: Collection[str] = (),
) -> Plan:
    """Choose the uids to serve; ``server_counts`` says how many servers each uid has now.

    A negative count marks a uid the caller prefers above all (e.g. one this volunteer trained before,
    whose weights it still holds). Then the uids the swarm serves with the least throughput go first
    (``served_throughput``: uid -> samples/s, from peers' records; a missing uid counts as 0), then
    those with the fewest servers. ``seed`` breaks the remaining ties; volunteers derive it from their
    peer id so that two joining at once do not pick the same uids. ``exclude``: uids never to pick
    (those another device of this volunteer serves).
    """
    device = pick_device(hardware, device)
    budget, budget_reason = _budget(hardware, device, max_memory)
    reserve = CUDA_CONTEXT_RESERVE if _is_gpu(device) else CPU_BASE_OVERHEAD
    batch, costs = _fit_batch(manifest, device, budget - reserve, budget_reason, reserve, dtype)
    cap, cap_reason = _count_cap(hardware, device, max_experts)
    served = served_throughput or {}
    picks, spent = _choose(manifest, server_counts, served, costs, budget - reserve, cap, seed, frozenset(exclude))
    uids = [uid for uid, _ in picks]
    reasons = [budget_reason, _reserve_reason(device, reserve)]
    if _is_gpu(device) and hardware.cpu.memory_available < GPU_HOST_OVERHEAD:
        short = f"only {_size(hardware.cpu.memory_available)} is available"
        reasons.append(f"warning: a GPU server needs about {_size(GPU_HOST_OVERHEAD)} of RAM, {short}")
    if batch < manifest.max_batch_size:
        reasons.append(f"max batch size halved from {manifest.max_batch_size} to {batch} so that one expert fits")
    reasons += [f"expert type {name!r} costs {_size(c.total)} at batch {batch}" for name, c in costs.items()]
    reasons += _choice_reasons(manifest, server_counts, uids, cap, cap_reason, budget - reserve - spent,
                               frozenset(exclude))
    if served_throughput and uids:
        rates = [finite_rate(served.get(uid, 0.0)) for uid in uids]
        reasons.append(f"least served throughput first: the picked uids had {min(rates):,.0f} to "
                       f"{max(rates):,.0f} samples/s served in the swarm")
    return Plan(
        device=device,
        budget_bytes=budget,
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
    manifest: Manifest, device: str, room: int, budget_reason: str, reserve: int, dtype: str
) -> tuple[int, dict[str, ExpertCost]]:
    """Halve the manifest's max batch size until one expert of the cheapest used type fits in ``room``."""
    used = [manifest.expert_type(name) for name in dict.fromkeys(layer.expert_type for layer in manifest.layers)]
    batch = manifest.max_batch_size
    while True:
        costs = {t.name: expert_cost(manifest, t, batch, device, dtype) for t in used}
        cheapest = min(costs.values(), key=lambda c: c.total)
        if cheapest.total <= room:
            return batch, costs
        if batch == 1:
            raise SizingError(
                f"one {cheapest.expert_type!r} expert needs {_size(cheapest.total)} at batch 1 plus "
                f"{_size(reserve)} reserved on {device}, {_size(cheapest.total + reserve)} in all, "
                f"but the {budget_reason}; raise max_memory or use a bigger device"
            )
        batch //= 2


def _count_cap(hardware: HardwareProfile, device: str, max_experts: int | None) -> tuple[int, str]:
    if max_experts is not None:
        if isinstance(max_experts, bool) or not isinstance(max_experts, int) or max_experts < 1:
            raise ValueError(f"max_experts must be a positive integer, got {max_experts!r:.40}")
        return max_experts, f"count cap {max_experts} (max_experts)"
    if _is_gpu(device):
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
        stop = f"memory full ({_size(left)} left, less than one more expert)"
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


def _reserve_reason(device: str, reserve: int) -> str:
    if _is_gpu(device):
        return f"{_size(reserve)} of {device} kept for the CUDA context"
    return f"{_size(reserve)} of RAM kept for the server process (torch, hivemind, DHT)"


def _is_gpu(device: str) -> bool:
    return device.startswith("cuda")


def _size(n: int) -> str:
    """Human bytes: 41 MiB, 3.2 GiB."""
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


# --- measured against the plan -------------------------------------------------------------------


def measure_plan(
    profile: HardwareProfile, manifest: Manifest, plan: Plan, cache_dir: Path, *, remeasure: bool = False,
    time_budget: float = TIME_BUDGET_S, torch_device: str | None = None,
) -> Plan:
    """The plan with its expert types measured on its device (cached), for ``volunteer hardware --plan``.

    ``torch_device``: where to measure, when the caller already mapped the plan's device for torch."""
    results = measure_throughput(
        manifest, cache_dir, device=torch_device or hardware.torch_device(profile, plan.device),
        device_name=device_name(profile, plan.device),
        max_batch=plan.max_batch_size, expert_types=_used_types(plan), dtype=plan.dtype,
        remeasure=remeasure, time_budget=time_budget,
    )
    return plan.with_throughput(results)


def _used_types(plan: Plan) -> tuple[str, ...]:
    # in the manifest's order (that of plan.costs) rather than pick order: the report lists them so
    listed = tuple(c.expert_type for c in plan.costs if c.expert_type in plan.expert_types)
    return listed or tuple(dict.fromkeys(plan.expert_types))


@dataclass(frozen=True)
class PlanCheck:
    """A plan's bytes next to what was measured, compared like for like (see ``basis``)."""

    device: str
    planned_bytes: int  # the figure the measurement is compared with
    measured_bytes: int
    budget_bytes: int
    basis: str  # what both figures cover, in words

    @property
    def ratio(self) -> float:
        """measured / planned: above 1 the model underestimates, far below 1 it wastes the budget."""
        return self.measured_bytes / self.planned_bytes if self.planned_bytes else math.inf

    @property
    def within_budget(self) -> bool:
        return self.measured_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        ratio = self.ratio if self.planned_bytes else None  # JSON has no infinity
        return {**asdict(self), "ratio": ratio, "within_budget": self.within_budget}

    @classmethod
    def of(cls, plan: Plan, measured_bytes: int) -> PlanCheck:
        if plan.device.startswith("cuda"):
            # torch's peak allocation leaves out the CUDA context and the allocator's slack, which the
            # plan keeps in its reserve and per-expert overhead: compare the tensors alone
            return cls(plan.device, plan.tensor_bytes, measured_bytes, plan.budget_bytes,
                       "tensors: weights, grads, optimizer state, activations (torch.cuda.max_memory_allocated)")
        # the peak RSS covers the interpreter, torch and the tensors, not the TaskPool child processes
        return cls(plan.device, plan.planned_bytes, measured_bytes, plan.budget_bytes,
                   "whole plan vs this process's peak resident memory (VmHWM)")
