"""The sizing policy over a table of volunteer machines: pure, fast, no torch work or network."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volunteer.hardware import CPUInfo, GPUInfo, HardwareProfile

with warnings.catch_warnings():
    # Importing hivemind calls torch.jit.script, which torch 2.13 deprecates with a warning attributed to
    # torch.jit, so pyproject's "ignore::DeprecationWarning:hivemind.*" misses it. Drop this block once
    # pyproject filters "ignore:.*torch.jit.script.* is deprecated:DeprecationWarning".
    warnings.simplefilter("ignore", DeprecationWarning)
    from volunteer.manifest import Manifest, default_manifest
from volunteer.sizing import (
    CPU_BASE_OVERHEAD,
    CPU_EXPERT_OVERHEAD,
    CUDA_CONTEXT_RESERVE,
    GPU_EXPERT_OVERHEAD,
    Plan,
    SizingError,
    expert_cost,
    memory_budget,
    pick_device,
    plan_experts,
)

MiB, GiB, GB = 2**20, 2**30, 10**9

DEFAULT = default_manifest()
BIG = Manifest.from_dict(
    dict(
        schema_version=1,
        name="big-lm",
        dht_prefix="big",
        d_model=1024,
        max_batch_size=1024,
        expert_types=[
            dict(name="small", block="residual_ffn", d_hidden=4096),
            dict(name="large", block="swiglu_ffn", d_hidden=8192),
        ],
        layers=[
            dict(uid_prefix="big_ffn0", grid=[16, 16], expert_type="small"),
            dict(uid_prefix="big_ffn1", grid=[16, 16], expert_type="large"),
        ],
    )
)
MANIFESTS = [DEFAULT, BIG]


def gpu_box(total_gb: float, index: int = 0) -> GPUInfo:
    total = int(total_gb * GB)
    return GPUInfo(index, f"GPU {total_gb:g} GB", f"GPU-{index}", total, total - 300 * MiB)


CPU_SMALL = CPUInfo(cores=2, memory_total=4 * GB, memory_available=3 * GB, model="laptop")
CPU_DESKTOP = CPUInfo(cores=8, memory_total=32 * GB, memory_available=24 * GB)
# From smallest to largest: each row lends at least as much as the one before.
MACHINES = {
    "cpu-2-cores-4GB": HardwareProfile(CPU_SMALL, (), "NVML not found"),
    "gpu-6GB": HardwareProfile(CPU_DESKTOP, (gpu_box(6),)),
    "gpu-8GB": HardwareProfile(CPU_DESKTOP, (gpu_box(8),)),
    "gpu-24GB": HardwareProfile(CPU_DESKTOP, (gpu_box(24),)),
    "gpu-80GB": HardwareProfile(CPU_DESKTOP, (gpu_box(80),)),
}


def reserve(plan: Plan) -> int:
    return CUDA_CONTEXT_RESERVE if plan.device.startswith("cuda") else CPU_BASE_OVERHEAD


def uid_costs(manifest: Manifest, plan: Plan) -> dict[str, int]:
    per_type = {t.name: expert_cost(manifest, t, plan.max_batch_size, plan.device).total for t in manifest.expert_types}
    return {uid: per_type[layer.expert_type] for layer in manifest.layers for uid in layer.uids()}


def check_plan(manifest: Manifest, plan: Plan, counts: dict[str, int]) -> None:
    """Invariants every plan keeps, replaying its picks one by one."""
    cost = uid_costs(manifest, plan)
    assert len(set(plan.uids)) == len(plan.uids) and plan.uids
    assert set(plan.uids) <= set(cost)
    assert plan.expert_types == tuple(manifest.layer_of(uid).expert_type for uid in plan.uids)
    assert plan.planned_bytes == reserve(plan) + sum(cost[uid] for uid in plan.uids) <= plan.budget_bytes
    left = plan.budget_bytes - reserve(plan)
    unpicked = set(cost)
    for uid in plan.uids:
        # never a more-served uid while a less-served one still fits
        assert counts.get(uid, 0) == min(counts.get(u, 0) for u in unpicked if cost[u] <= left)
        unpicked.discard(uid)
        left -= cost[uid]


# --- costs ---------------------------------------------------------------------------------------


def test_expert_cost_adds_up() -> None:
    small = DEFAULT.expert_type("small")  # residual_ffn, d_model 64, d_hidden 256, adam
    params = 64 * 256 * 2 + 256 + 64 + 2 * 64
    cost = expert_cost(DEFAULT, small, 1024, "cpu")
    assert (cost.params, cost.weights, cost.grads, cost.optimizer) == (params, 4 * params, 4 * params, 8 * params)
    assert cost.activations == (3 * 256 + 4 * 64) * 1024 * 4 * 2
    assert cost.overhead == CPU_EXPERT_OVERHEAD
    assert cost.total == 16 * params + cost.activations + CPU_EXPERT_OVERHEAD
    assert expert_cost(DEFAULT, small, 1024, "cuda:0").overhead == GPU_EXPERT_OVERHEAD
    sgd = Manifest.from_dict({**DEFAULT.to_dict(), "optimizer": {"name": "sgd", "lr": 0.1}})
    assert expert_cost(sgd, small, 1024, "cpu").optimizer == 0


# --- device and budget ---------------------------------------------------------------------------


def test_pick_device() -> None:
    two = HardwareProfile(CPU_DESKTOP, (gpu_box(8, 0), gpu_box(24, 1)))
    assert pick_device(two, None) == "cuda:1"  # most free memory
    assert pick_device(two, "cuda") == "cuda:1"
    assert pick_device(two, "cuda:0") == "cuda:0"
    assert pick_device(two, "cpu") == "cpu"
    assert pick_device(MACHINES["cpu-2-cores-4GB"], None) == "cpu"
    with pytest.raises(ValueError, match="cuda:0, cuda:1"):
        pick_device(two, "cuda:2")
    with pytest.raises(ValueError, match="no GPU was found \\(NVML not found\\)"):
        pick_device(MACHINES["cpu-2-cores-4GB"], "cuda")
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        pick_device(two, "tpu")


def test_memory_budget_defaults_fractions_and_bytes() -> None:
    cpu, gpu = MACHINES["cpu-2-cores-4GB"], MACHINES["gpu-8GB"]
    free = gpu.gpus[0].memory_free
    assert memory_budget(cpu, "cpu", None) == int(0.5 * 3 * GB)
    assert memory_budget(gpu, "cuda:0", None) == int(0.8 * free)
    assert memory_budget(cpu, "cpu", 0.25) == int(0.25 * 3 * GB)
    assert memory_budget(cpu, "cpu", 1) == memory_budget(cpu, "cpu", 1.0) == 3 * GB
    assert memory_budget(cpu, "cpu", 2 * GiB) == 2 * GiB
    assert memory_budget(cpu, "cpu", 2e9) == 2 * GB  # a whole float is bytes too (TOML, "2e9")
    assert memory_budget(cpu, "cpu", 100 * GiB) == 3 * GB  # capped at what is available
    assert memory_budget(gpu, "cuda:0", 100 * GiB) == free


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.5, math.nan, math.inf, True, "8GiB"])
def test_memory_budget_refuses_nonsense(bad: object) -> None:
    with pytest.raises(ValueError, match="max_memory must be") as info:
        memory_budget(MACHINES["cpu-2-cores-4GB"], "cpu", bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_memory_budget_of_an_unknown_gpu() -> None:
    with pytest.raises(ValueError, match="cuda:3"):
        memory_budget(MACHINES["gpu-8GB"], "cuda:3", None)


# --- plans over the table of machines ------------------------------------------------------------


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda m: m.name)
@pytest.mark.parametrize("machine", MACHINES, ids=str)
def test_plans_stay_within_budget(manifest: Manifest, machine: str) -> None:
    plan = plan_experts(MACHINES[machine], manifest, {})
    check_plan(manifest, plan, {})
    assert plan.device == ("cpu" if machine.startswith("cpu") else "cuda:0")
    assert any(r.startswith("budget ") for r in plan.reasons)
    assert any(r.startswith(f"picked {len(plan.uids)} experts: ") for r in plan.reasons)


@pytest.mark.parametrize("max_experts", [None, 10_000])
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda m: m.name)
def test_bigger_machines_host_at_least_as_much(manifest: Manifest, max_experts: int | None) -> None:
    plans = [plan_experts(hw, manifest, {}, max_experts=max_experts) for hw in MACHINES.values()]
    for smaller, bigger in zip(plans, plans[1:]):
        assert len(bigger.uids) >= len(smaller.uids)
        if smaller.device == bigger.device:  # bytes compare only under one cost model (CPU overheads are larger)
            assert bigger.planned_bytes >= smaller.planned_bytes


def test_the_big_manifest_separates_the_gpus() -> None:
    # the point of the big manifest: GPUs are told apart by memory, not all stopped by one count cap
    counts = [len(plan_experts(MACHINES[m], BIG, {}).uids) for m in ("gpu-6GB", "gpu-8GB", "gpu-24GB", "gpu-80GB")]
    assert counts == sorted(counts) and len(set(counts)) == 4, counts


def test_cpu_count_cap_is_two_per_core() -> None:
    plan = plan_experts(MACHINES["cpu-2-cores-4GB"], DEFAULT, {})
    assert len(plan.uids) == 4
    assert "picked 4 experts: count cap 4 (2 x 2 cores, at most 16)" in plan.reasons
    assert len(plan_experts(MACHINES["cpu-2-cores-4GB"], DEFAULT, {}, max_experts=2).uids) == 2
    with pytest.raises(ValueError, match="max_experts"):
        plan_experts(MACHINES["cpu-2-cores-4GB"], DEFAULT, {}, max_experts=0)


def test_plans_are_deterministic_and_seeds_differ() -> None:
    hw = MACHINES["gpu-24GB"]
    assert plan_experts(hw, DEFAULT, {}, seed=7) == plan_experts(hw, DEFAULT, {}, seed=7)
    orders = {plan_experts(hw, DEFAULT, {}, seed=seed).uids for seed in range(5)}
    assert len(orders) == 5  # two volunteers joining an empty swarm start on different uids
    assert all(sorted(o) == sorted(DEFAULT.all_uids()) for o in orders)  # the GPU fits every uid


def test_picks_spread_over_layers_when_counts_tie() -> None:
    plan = plan_experts(MACHINES["gpu-24GB"], DEFAULT, {}, seed=3)
    layers = [uid.split(".")[0] for uid in plan.uids]
    for k in range(1, len(layers) + 1):
        assert abs(layers[:k].count("tinylm_ffn0") - layers[:k].count("tinylm_ffn1")) <= 1


def test_unserved_uids_come_first() -> None:
    uids = DEFAULT.all_uids()
    counts = {uid: 1 for uid in uids[::2]}  # every other uid already has a server
    unserved = set(uids) - set(counts)
    gpu_plan = plan_experts(MACHINES["gpu-24GB"], DEFAULT, counts)
    assert set(gpu_plan.uids[: len(unserved)]) == unserved
    check_plan(DEFAULT, gpu_plan, counts)
    assert f"{len(unserved)} uids had no server; picked {len(unserved)} of them first, then the least served" in (
        gpu_plan.reasons
    )
    cpu_plan = plan_experts(MACHINES["cpu-2-cores-4GB"], DEFAULT, counts)
    assert set(cpu_plan.uids) <= unserved
    assert f"{len(unserved)} uids had no server; picked from those" in cpu_plan.reasons


def test_a_negative_count_marks_a_preferred_uid() -> None:
    keep = DEFAULT.all_uids()[5]
    plan = plan_experts(MACHINES["cpu-2-cores-4GB"], DEFAULT, {keep: -1}, seed=11)
    assert plan.uids[0] == keep


def test_cheap_served_uids_are_taken_when_unserved_ones_do_not_fit() -> None:
    # the large layer is unserved but only small experts fit: serving something beats serving nothing
    small_uids = [uid for uid in BIG.all_uids() if BIG.expert_type_of(uid).name == "small"]
    counts = {uid: 2 for uid in small_uids}
    cpu = MACHINES["cpu-2-cores-4GB"]
    small = expert_cost(BIG, BIG.expert_type("small"), 1024, "cpu").total
    plan = plan_experts(cpu, BIG, counts, max_memory=CPU_BASE_OVERHEAD + 2 * small)
    assert plan.expert_types == ("small", "small")
    check_plan(BIG, plan, counts)


def test_batch_is_halved_until_one_expert_fits() -> None:
    cost = lambda batch: expert_cost(BIG, BIG.expert_type("small"), batch, "cpu").total  # noqa: E731
    plan = plan_experts(MACHINES["cpu-2-cores-4GB"], BIG, {}, max_memory=CPU_BASE_OVERHEAD + cost(256))
    assert plan.max_batch_size == 256 and plan.expert_types == ("small",)
    assert "max batch size halved from 1024 to 256 so that one expert fits" in plan.reasons
    check_plan(BIG, plan, {})


def test_too_small_a_budget_says_what_is_needed() -> None:
    with pytest.raises(SizingError, match=r"needs .* at batch 1 .* but the budget 600 MiB") as info:
        plan_experts(MACHINES["cpu-2-cores-4GB"], DEFAULT, {}, max_memory=600 * MiB)
    assert "\n" not in str(info.value) and "max_memory" in str(info.value)
    tiny_gpu = HardwareProfile(CPU_DESKTOP, (GPUInfo(0, "tiny", "GPU-t", GiB, 400 * MiB),))
    with pytest.raises(SizingError, match="cuda:0"):
        plan_experts(tiny_gpu, DEFAULT, {})


def test_plan_round_trips_through_json() -> None:
    plan = plan_experts(MACHINES["gpu-8GB"], BIG, {}, seed=5)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


# --- property ------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    manifest=st.sampled_from(MANIFESTS),
    machine=st.sampled_from(sorted(MACHINES)),
    fraction=st.floats(0.01, 1.0),
    raw_counts=st.lists(st.integers(-1, 3), min_size=512, max_size=512),
    max_experts=st.none() | st.integers(1, 100),
    seed=st.integers(0, 2**32),
)
def test_any_plan_fits_its_budget(
    manifest: Manifest, machine: str, fraction: float, raw_counts: list[int], max_experts: int | None, seed: int
) -> None:
    hw = MACHINES[machine]
    counts = dict(zip(manifest.all_uids(), raw_counts))
    try:
        plan = plan_experts(hw, manifest, counts, max_memory=fraction, max_experts=max_experts, seed=seed)
    except SizingError:
        device = pick_device(hw, None)
        budget = memory_budget(hw, device, fraction)
        cheapest = min(expert_cost(manifest, t, 1, device).total for t in manifest.expert_types)
        room = budget - (CUDA_CONTEXT_RESERVE if device.startswith("cuda") else CPU_BASE_OVERHEAD)
        assert cheapest > room  # only raised when truly nothing fits
        return
    check_plan(manifest, plan, counts)
    assert len(plan.uids) <= (max_experts or 64)
