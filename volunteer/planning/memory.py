"""What one expert costs in memory, what the volunteer lets it use, and how the plan held up.

The memory model is deliberately simple and errs on the side of safety: every byte an expert can hold
in the plan's dtype (weights, gradients, optimizer state, activations of a full batch) plus a
per-expert and a per-server reserve. ``PlanCheck`` then holds it to account: the planned bytes next to
what the process actually peaked at, for the dashboard and ``volunteer status``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from pydantic import PlainSerializer, TypeAdapter, computed_field

from volunteer.core.blocks import BLOCKS, OPTIMIZERS
from volunteer.core.manifest import ExpertType, Manifest, Optimizer
from volunteer.host.hardware import HardwareProfile
from volunteer.planning.devices import Device, find_gpu
from volunteer.serving.version_budget import version_bytes, versions_to_keep

MiB = 2**20
GiB = 2**30
# fp32 is the default; torch keeps grads and optimizer state in the weights' dtype, so one size fits all
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# hivemind runs two TaskPool processes (forward and backward) per expert on top of the runtime; each
# one's interpreter pages and shared-memory batch buffers cost far more on CPU than the weights do.
CPU_EXPERT_OVERHEAD = 96 * MiB
# The lean path (serving.handler, the default) runs no process per expert: what is left is the
# allocator's slack around its batches and the expert's Python objects.
LEAN_CPU_EXPERT_OVERHEAD = 16 * MiB
# The lean path's kept forwards hold a copy of the weights of each optimizer step they come from:
# serving.activations.MAX_STALENESS + 1 copies at most (tests/test_kept_forwards.py checks the two agree).
KEPT_WEIGHT_COPIES = 4
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
    # the versions kept for audits (``serving.versions.VersionStore``), in host memory: counted here on
    # a CPU; a GPU's copies leave its budget alone (0 here), like GPU_HOST_OVERHEAD
    audit: int = 0

    @property
    def tensors(self) -> int:
        """What torch's allocator holds for it, i.e. what ``torch.cuda.max_memory_allocated`` sees."""
        return self.weights + self.grads + self.optimizer + self.activations

    @computed_field  # in the JSON too, for `volunteer hardware --json` readers; ignored when read back
    @property
    def total(self) -> int:
        return self.tensors + self.overhead + self.audit


def optimizer_states(optimizer: Optimizer) -> int:
    """Parameter-sized tensors the optimizer keeps: Adam 2, SGD 1 with momentum and 0 without."""
    if optimizer.name == "sgd":  # the manifest has no momentum yet and serving builds plain SGD
        return 1 if getattr(optimizer, "momentum", 0) else 0
    return OPTIMIZERS[optimizer.name].states


def expert_cost(
    manifest: Manifest, expert_type: ExpertType, batch_size: int, device_kind: str, dtype: str = "float32",
    *, task_pools: bool = True,
) -> ExpertCost:
    """``device_kind`` is ``cpu`` or ``cuda`` (a ``Device``'s kind); ``task_pools``: whether the serving
    path runs hivemind's TaskPool processes (``serving = "hivemind"``; the lean path does not)."""
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
        # x2: hivemind's backward recomputes the forward pass, so both sets of activations coexist; on
        # the lean path the second set is the kept forwards (serving.activations: one max batch at most),
        # which also hold the copies of the weights they were computed on
        activations=per_sample * batch_size * size * 2 + (0 if task_pools else KEPT_WEIGHT_COPIES * params * size),
        overhead=(GPU_EXPERT_OVERHEAD if device_kind == "cuda"
                  else CPU_EXPERT_OVERHEAD if task_pools else LEAN_CPU_EXPERT_OVERHEAD),
        batch_size=batch_size,
        dtype=dtype,
        audit=0 if device_kind == "cuda" else audit_bytes(params, optimizer_states(manifest.optimizer),
                                                          batch_size, manifest.d_model),
    )


def audit_bytes(params: int, optimizer_states: int, batch_size: int, d_model: int) -> int:
    """Host memory of the versions one expert keeps to reveal them to audits: up to ``KEEP_VERSIONS``
    copies of its fp32 weights and optimizer state, each with the batch (inputs and gradients) of the
    step that made it, at most ``AUDIT_MEMORY_CAP`` beyond two versions. Bounded whatever the traffic."""
    one = version_bytes(params, optimizer_states, batch_size, d_model)
    return versions_to_keep(one) * one


# --- budget and reserve --------------------------------------------------------------------------


def memory_budget(hardware: HardwareProfile, device: Device, max_memory: float | None) -> int:
    """Bytes the volunteer may use on ``device``.

    ``None``: a safe default fraction (CPU: 0.5 of available RAM, GPU: 0.8 of free memory); a float in
    (0, 1]: that fraction; a whole number > 1: bytes, capped at what is free or available.
    """
    return budget(hardware, device, max_memory)[0]


def budget(hardware: HardwareProfile, device: Device, max_memory: float | None) -> tuple[int, str]:
    """The budget and the sentence explaining it."""
    free, where = _free_memory(hardware, device)
    if max_memory is None:
        fraction = DEFAULT_FRACTION[device.kind]
        return int(fraction * free), f"budget {size(int(fraction * free))} = {fraction:.0%} of {size(free)} {where}"
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not math.isfinite(max_memory):
        raise ValueError(f"max_memory must be a fraction in (0, 1] or a number of bytes, got {max_memory!r:.40}")
    if 0 < max_memory <= 1:
        share = int(max_memory * free)
        return share, f"budget {size(share)} = {max_memory:.0%} of {size(free)} {where} (max_memory)"
    if max_memory > 1 and float(max_memory).is_integer():
        asked = int(max_memory)
        if asked > free:
            return free, f"budget {size(free)} = all {where}; max_memory asked for {size(asked)}"
        return asked, f"budget {size(asked)} of {size(free)} {where} (max_memory)"
    raise ValueError(f"max_memory must be a fraction in (0, 1] or a whole number of bytes, got {max_memory!r}")


def _free_memory(hardware: HardwareProfile, device: Device) -> tuple[int, str]:
    if not device.is_gpu:
        return hardware.cpu.memory_available, "available RAM"
    gpu = find_gpu(hardware, device)
    if gpu is None:
        raise ValueError(f"device {str(device)!r} is not cpu or a GPU of this machine")
    return gpu.memory_free, f"free memory on {device} ({gpu.name})"


def device_reserve(device: Device) -> tuple[int, str]:
    """The bytes a device keeps outside any expert, and the sentence saying for what."""
    if device.is_gpu:
        return CUDA_CONTEXT_RESERVE, f"{size(CUDA_CONTEXT_RESERVE)} of {device} kept for the CUDA context"
    return CPU_BASE_OVERHEAD, f"{size(CPU_BASE_OVERHEAD)} of RAM kept for the server process (torch, hivemind, DHT)"


def size(n: int) -> str:
    """Human bytes: 41 MiB, 3.2 GiB."""
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


# --- measured against the plan -------------------------------------------------------------------


class PlannedMemory(Protocol):
    """What ``PlanCheck.of`` reads of a ``choice.Plan`` (named so, not imported: the plan is built on top of this module)."""

    device: Device
    planned_bytes: int
    budget_bytes: int

    @property
    def tensor_bytes(self) -> int: ...


# JSON has no infinity: a ratio over nothing planned is written null
_FiniteOrNull = Annotated[float, PlainSerializer(lambda r: r if math.isfinite(r) else None, return_type=float | None)]


@dataclass(frozen=True)
class PlanCheck:
    """A plan's bytes next to what was measured, compared like for like (see ``basis``)."""

    device: Device
    planned_bytes: int  # the figure the measurement is compared with
    measured_bytes: int
    budget_bytes: int
    basis: str  # what both figures cover, in words

    @computed_field
    @property
    def ratio(self) -> _FiniteOrNull:
        """measured / planned: above 1 the model underestimates, far below 1 it wastes the budget."""
        return self.measured_bytes / self.planned_bytes if self.planned_bytes else math.inf

    @computed_field
    @property
    def within_budget(self) -> bool:
        return self.measured_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return PLAN_CHECK_JSON.dump_python(self, mode="json")

    @classmethod
    def of(cls, plan: PlannedMemory, measured_bytes: int) -> PlanCheck:
        if plan.device.is_gpu:
            # torch's peak allocation leaves out the CUDA context and the allocator's slack, which the
            # plan keeps in its reserve and per-expert overhead: compare the tensors alone
            return cls(plan.device, plan.tensor_bytes, measured_bytes, plan.budget_bytes,
                       "tensors: weights, grads, optimizer state, activations (torch.cuda.max_memory_allocated)")
        # the peak RSS covers the interpreter, torch and the tensors, not the TaskPool child processes
        return cls(plan.device, plan.planned_bytes, measured_bytes, plan.budget_bytes,
                   "whole plan vs this process's peak resident memory (VmHWM)")


PLAN_CHECK_JSON = TypeAdapter(PlanCheck)
