"""The sizing policy over a table of volunteer machines: pure, fast, no torch work or network."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import (
    BIG,
    CPU_DESKTOP,
    DEFAULT,
    MACHINES,
    MANIFESTS,
    check_plan,
    gpu_box,
)
from volunteer.host.hardware import GPUInfo, HardwareProfile

with warnings.catch_warnings():
    # Importing hivemind calls torch.jit.script, which torch 2.13 deprecates with a warning attributed to
    # torch.jit, so pyproject's "ignore::DeprecationWarning:hivemind.*" misses it. Drop this block once
    # pyproject filters "ignore:.*torch.jit.script.* is deprecated:DeprecationWarning".
    warnings.simplefilter("ignore", DeprecationWarning)
    from volunteer.core.manifest import Manifest
from volunteer.planning.choice import Plan, plan_experts
from volunteer.planning.devices import CPU, Device, pick_device
from volunteer.planning.memory import (
    CPU_BASE_OVERHEAD,
    CPU_EXPERT_OVERHEAD,
    CUDA_CONTEXT_RESERVE,
    GPU_EXPERT_OVERHEAD,
    LEAN_CPU_EXPERT_OVERHEAD,
    SizingError,
    expert_cost,
    memory_budget,
    optimizer_states,
)
from volunteer.planning.rebalance import Rebalance, rebalance_moves
from volunteer.planning.throughput import Throughput

MiB, GiB, GB = 2**20, 2**30, 10**9

# --- costs ---------------------------------------------------------------------------------------


def test_expert_cost_adds_up() -> None:
    small = DEFAULT.expert_type("small")  # residual_ffn, d_model 64, d_hidden 256, adam
    params = 64 * 256 * 2 + 256 + 64 + 2 * 64
    cost = expert_cost(DEFAULT, small, 1024, "cpu")
    assert (cost.params, cost.weights, cost.grads, cost.optimizer) == (params, 4 * params, 4 * params, 8 * params)
    assert cost.activations == (3 * 256 + 4 * 64) * 1024 * 4 * 2
    assert cost.overhead == CPU_EXPERT_OVERHEAD
    # 16 versions kept for audits: weights and Adam's two states, and the step's inputs and gradients
    assert cost.audit == 16 * 4 * (3 * params + 2 * 1024 * 64)
    assert cost.total == 16 * params + cost.activations + CPU_EXPERT_OVERHEAD + cost.audit
    assert expert_cost(DEFAULT, small, 1024, "cuda").overhead == GPU_EXPERT_OVERHEAD
    assert expert_cost(DEFAULT, small, 1024, "cuda").audit == 0  # in host memory, not the GPU's budget
    sgd = Manifest.from_dict({**DEFAULT.to_dict(), "optimizer": {"name": "sgd", "lr": 0.1}})
    assert expert_cost(sgd, small, 1024, "cpu").optimizer == 0
    assert cost.tensors == cost.total - CPU_EXPERT_OVERHEAD - cost.audit and (cost.batch_size, cost.dtype) == (1024, "float32")


def test_optimizer_state_per_optimizer() -> None:
    assert [optimizer_states(SimpleNamespace(name=n)) for n in ("adam", "adamw", "sgd")] == [2, 2, 0]
    assert optimizer_states(SimpleNamespace(name="sgd", momentum=0.9)) == 1  # the momentum buffer


def test_half_precision_halves_every_tensor_but_not_the_overhead() -> None:
    small = DEFAULT.expert_type("small")
    full, half = expert_cost(DEFAULT, small, 256, "cuda"), expert_cost(DEFAULT, small, 256, "cuda", "bfloat16")
    assert 2 * half.tensors == full.tensors and half.overhead == full.overhead and half.dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        expert_cost(DEFAULT, small, 256, "cuda", "int8")
    # same budget, cheaper experts: at least as many of them
    hw = MACHINES["gpu-6GB"]
    assert len(plan_experts(hw, BIG, {}, dtype="float16").uids) >= len(plan_experts(hw, BIG, {}).uids)


# --- device and budget ---------------------------------------------------------------------------


def test_pick_device() -> None:
    two = HardwareProfile(CPU_DESKTOP, (gpu_box(8, 0), gpu_box(24, 1)))
    assert pick_device(two, None) == Device("cuda", 1)  # most free memory
    assert pick_device(two, "cuda") == Device("cuda", 1)
    assert pick_device(two, "cuda:0") == pick_device(two, Device("cuda", 0)) == Device("cuda", 0)
    assert pick_device(two, "cpu") == pick_device(two, CPU) == CPU
    assert pick_device(MACHINES["cpu-2-cores-4GB"], None) == CPU
    with pytest.raises(ValueError, match="cuda:0, cuda:1"):
        pick_device(two, "cuda:2")
    with pytest.raises(ValueError, match="cuda:0, cuda:1"):
        pick_device(two, Device("cuda", 2))
    with pytest.raises(ValueError, match="no GPU was found \\(NVML not found\\)"):
        pick_device(MACHINES["cpu-2-cores-4GB"], "cuda")
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        pick_device(two, "tpu")


def test_memory_budget_defaults_fractions_and_bytes() -> None:
    cpu, gpu = MACHINES["cpu-2-cores-4GB"], MACHINES["gpu-8GB"]
    free = gpu.gpus[0].memory_free
    assert memory_budget(cpu, CPU, None) == int(0.5 * 3 * GB)
    assert memory_budget(gpu, Device("cuda", 0), None) == int(0.8 * free)
    assert memory_budget(cpu, CPU, 0.25) == int(0.25 * 3 * GB)
    assert memory_budget(cpu, CPU, 1) == memory_budget(cpu, CPU, 1.0) == 3 * GB
    assert memory_budget(cpu, CPU, 2 * GiB) == 2 * GiB
    assert memory_budget(cpu, CPU, 2e9) == 2 * GB  # a whole float is bytes too (TOML, "2e9")
    assert memory_budget(cpu, CPU, 100 * GiB) == 3 * GB  # capped at what is available
    assert memory_budget(gpu, Device("cuda", 0), 100 * GiB) == free


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.5, math.nan, math.inf, True, "8GiB"])
def test_memory_budget_refuses_nonsense(bad: object) -> None:
    with pytest.raises(ValueError, match="max_memory must be") as info:
        memory_budget(MACHINES["cpu-2-cores-4GB"], CPU, bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_memory_budget_of_an_unknown_gpu() -> None:
    with pytest.raises(ValueError, match="cuda:3"):
        memory_budget(MACHINES["gpu-8GB"], Device("cuda", 3), None)


# --- plans over the table of machines ------------------------------------------------------------


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda m: m.name)
@pytest.mark.parametrize("machine", MACHINES, ids=str)
def test_plans_stay_within_budget(manifest: Manifest, machine: str) -> None:
    plan = plan_experts(MACHINES[machine], manifest, {})
    check_plan(manifest, plan, {})
    assert str(plan.device) == ("cpu" if machine.startswith("cpu") else "cuda:0")
    assert any(r.startswith("budget ") for r in plan.reasons)
    assert any(r.startswith(f"picked {len(plan.uids)} experts: ") for r in plan.reasons)


@pytest.mark.parametrize("max_experts", [None, 10_000])
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda m: m.name)
def test_bigger_machines_host_at_least_as_much(manifest: Manifest, max_experts: int | None) -> None:
    plans = [plan_experts(hw, manifest, {}, max_experts=max_experts) for hw in MACHINES.values()]
    for smaller, bigger in itertools.pairwise(plans):
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


def test_the_lean_path_reserves_no_task_pool_processes() -> None:
    """On the CPU the lean path (no TaskPool processes) plans less per expert, so more experts fit the same
    budget; on a GPU the overhead is the allocator's either way."""
    small = DEFAULT.expert_type("small")
    pools, lean = (expert_cost(DEFAULT, small, 1024, "cpu", task_pools=p) for p in (True, False))
    assert lean.overhead == LEAN_CPU_EXPERT_OVERHEAD < pools.overhead == CPU_EXPERT_OVERHEAD
    assert lean.total < pools.total  # the weight copies of its kept forwards cost less than the pools
    assert expert_cost(DEFAULT, small, 1024, "cuda", task_pools=False).overhead == GPU_EXPERT_OVERHEAD
    cpu = MACHINES["cpu-2-cores-4GB"]
    budget = CPU_BASE_OVERHEAD + 2 * pools.total
    with_pools = plan_experts(cpu, DEFAULT, {}, max_memory=budget, max_experts=8, device="cpu")
    without = plan_experts(cpu, DEFAULT, {}, max_memory=budget, max_experts=8, device="cpu", task_pools=False)
    assert len(without.uids) > len(with_pools.uids) >= 1
    assert without.planned_bytes <= budget


def test_batch_is_halved_until_one_expert_fits() -> None:
    def cost(batch: int) -> int:
        return expert_cost(BIG, BIG.expert_type("small"), batch, "cpu").total

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
    measured = plan.with_throughput([Throughput("small", "GPU 8 GB", 64, 51234.5, {16: 20000.0, 64: 51234.5}, True)])
    data = json.loads(json.dumps(measured.to_dict()))
    assert Plan.from_dict(data) == measured and hash(measured)
    # what `volunteer hardware --plan --json` shows: costs with their totals, throughput by batch
    assert {c["expert_type"]: c["total"] for c in data["costs"]} == {c.expert_type: c.total for c in plan.costs}
    assert data["throughput"][0]["by_batch"] == {"16": 20000.0, "64": 51234.5}
    assert "expert type 'small' trains 51,234 samples/s on GPU 8 GB, best at batch 64 (cached)" in data["reasons"]


def test_a_plan_saved_before_costs_were_recorded_still_loads() -> None:
    plan = plan_experts(MACHINES["cpu-2-cores-4GB"], DEFAULT, {})
    old = {k: v for k, v in plan.to_dict().items() if k not in ("dtype", "reserve_bytes", "costs", "throughput")}
    loaded = Plan.from_dict(old)
    assert loaded.uids == plan.uids and loaded.costs == () and loaded.dtype == "float32"
    assert loaded.tensor_bytes == plan.planned_bytes  # all an old plan can say


def test_tensor_bytes_leave_out_reserves_and_overheads() -> None:
    plan = plan_experts(MACHINES["gpu-24GB"], DEFAULT, {})
    overheads = len(plan.uids) * GPU_EXPERT_OVERHEAD
    assert plan.tensor_bytes == plan.planned_bytes - CUDA_CONTEXT_RESERVE - overheads


# --- the table of machines, with the swarm's served throughput -----------------------------------


def test_mixed_gpus_plan_on_the_bigger_one_unless_told() -> None:
    mixed = MACHINES["gpu-24GB+6GB"]
    assert plan_experts(mixed, BIG, {}) == plan_experts(MACHINES["gpu-24GB"], BIG, {})
    small_gpu = plan_experts(mixed, BIG, {}, device="cuda:1")
    assert small_gpu.device == Device("cuda", 1)
    assert small_gpu.budget_bytes == memory_budget(mixed, Device("cuda", 1), None)
    assert small_gpu.uids == plan_experts(MACHINES["gpu-6GB"], BIG, {}).uids
    check_plan(BIG, small_gpu, {})


@pytest.mark.parametrize("machine", MACHINES, ids=str)
def test_least_served_throughput_goes_first(machine: str) -> None:
    uids = DEFAULT.all_uids()
    served = {uid: float(100 * (i % 5)) for i, uid in enumerate(uids)}  # five levels, 0 to 400 samples/s
    counts = {uid: 1 + i % 3 for i, uid in enumerate(uids)}
    plan = plan_experts(MACHINES[machine], DEFAULT, counts, served_throughput=served, seed=9)
    check_plan(DEFAULT, plan, counts, served)
    assert plan == plan_experts(MACHINES[machine], DEFAULT, counts, served_throughput=served, seed=9)
    picked = sorted(served[uid] for uid in plan.uids)
    assert picked == sorted(served.values())[: len(picked)]
    assert any(r.startswith("least served throughput first") for r in plan.reasons)


def test_served_throughput_ties_go_by_server_count_and_preferred_uids_stay_first() -> None:
    a, b, c, keep = DEFAULT.all_uids()[:4]
    served = {uid: 500.0 for uid in DEFAULT.all_uids()} | {a: 10.0, b: 10.0, c: 10.0, keep: 900.0}
    counts = {a: 3, b: 1, c: 2, keep: -1}
    plan = plan_experts(MACHINES["gpu-24GB"], DEFAULT, counts, served_throughput=served)
    assert plan.uids[:4] == (keep, b, c, a)


def test_untrusted_throughput_values_cannot_break_the_order() -> None:
    uids = DEFAULT.all_uids()
    served = {uids[0]: math.nan, uids[1]: -5.0, uids[2]: math.inf} | {u: 7.0 for u in uids[3:]}
    plan = plan_experts(MACHINES["gpu-24GB"], DEFAULT, {}, served_throughput=served, seed=1)
    assert set(plan.uids[:3]) == set(uids[:3])  # read as 0 samples/s: the least served


def test_no_served_throughput_is_the_old_order() -> None:
    counts = {uid: i % 3 for i, uid in enumerate(DEFAULT.all_uids())}
    for machine in MACHINES.values():
        assert plan_experts(machine, DEFAULT, counts, seed=4) == plan_experts(
            machine, DEFAULT, counts, seed=4, served_throughput={}
        )


# --- property ------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    manifest=st.sampled_from(MANIFESTS),
    machine=st.sampled_from(sorted(MACHINES)),
    fraction=st.floats(0.01, 1.0),
    raw_counts=st.lists(st.integers(-1, 3), min_size=512, max_size=512),
    raw_served=st.none() | st.lists(st.sampled_from([0.0, 10.0, 250.0, 1e4]), min_size=512, max_size=512),
    max_experts=st.none() | st.integers(1, 100),
    seed=st.integers(0, 2**32),
)
def test_any_plan_fits_its_budget(
    manifest: Manifest, machine: str, fraction: float, raw_counts: list[int], raw_served: list[float] | None,
    max_experts: int | None, seed: int,
) -> None:
    hw = MACHINES[machine]
    counts = dict(zip(manifest.all_uids(), raw_counts))
    served = dict(zip(manifest.all_uids(), raw_served)) if raw_served is not None else None
    try:
        plan = plan_experts(hw, manifest, counts, max_memory=fraction, max_experts=max_experts, seed=seed,
                            served_throughput=served)
    except SizingError:
        device = pick_device(hw, None)
        budget = memory_budget(hw, device, fraction)
        cheapest = min(expert_cost(manifest, t, 1, device.kind).total for t in manifest.expert_types)
        room = budget - (CUDA_CONTEXT_RESERVE if device.is_gpu else CPU_BASE_OVERHEAD)
        assert cheapest > room  # only raised when truly nothing fits
        return
    check_plan(manifest, plan, counts, served)
    assert len(plan.uids) <= (max_experts or 64)


# --- rebalancing ---------------------------------------------------------------------------------


def test_rebalance_moves_my_most_replicated_uid_to_the_weakest() -> None:
    swarm = {"a": 1000.0, "b": 400.0, "c": 0.0, "d": 300.0}
    moves = rebalance_moves(["a", "b"], swarm, {"a": 200.0, "b": 200.0})
    assert moves == Rebalance(drop=("a",), take=("c",))  # then d (300) is not under half of b (400): done
    # no clear case: the weakest has more than half of what my most served uid has
    assert rebalance_moves(["a"], {"a": 1000.0, "c": 600.0}, {"a": 200.0}) == Rebalance()
    # a move that would leave my uid weaker than the target was: no move
    assert not rebalance_moves(["a"], {"a": 1000.0, "c": 100.0}, {"a": 950.0})


def test_rebalance_never_drops_a_uid_without_another_server() -> None:
    swarm = {"a": 1000.0, "c": 0.0}
    assert not rebalance_moves(["a"], swarm, {"a": 1000.0})  # I am a's only server
    assert not rebalance_moves(["a"], swarm, {"a": 200.0}, server_counts={"a": 1})  # others claim it, counts say no
    assert rebalance_moves(["a"], swarm, {"a": 200.0}, server_counts={"a": 2}).take == ("c",)


def test_rebalance_keeps_expert_types_when_told() -> None:
    swarm = {"a": 1000.0, "big": 0.0, "small": 100.0}
    types = {"a": "small", "big": "large", "small": "small"}
    moves = rebalance_moves(["a"], swarm, {"a": 200.0}, expert_types=types)
    assert moves == Rebalance(drop=("a",), take=("small",))  # "big" is weaker but would not fit the plan


def test_rebalance_does_nothing_without_throughput_of_mine() -> None:
    assert not rebalance_moves(["a"], {"a": 1000.0, "c": 0.0}, {})
    with pytest.raises(ValueError, match="margin"):
        rebalance_moves(["a"], {"a": 1.0}, {}, margin=0)


def coverage_after(swarm: dict[str, float], mine: dict[str, float], moves: Rebalance) -> dict[str, float]:
    after = dict(swarm)
    for donor, target in zip(moves.drop, moves.take):
        after[donor] -= mine[donor]
        after[target] += mine[donor]
    return after


@settings(max_examples=300, deadline=None)
@given(
    rates=st.lists(st.sampled_from([0.0, 1.0, 5.0, 50.0, 100.0, 400.0, 1000.0]), min_size=2, max_size=24),
    data=st.data(),
    margin=st.sampled_from([0.25, 0.5, 0.9]),
    typed=st.booleans(),
)
def test_rebalance_properties(rates: list[float], data: st.DataObject, margin: float, typed: bool) -> None:
    grid = [f"u{i}" for i in range(len(rates))]
    mine_uids = data.draw(st.lists(st.sampled_from(grid), min_size=1, max_size=len(grid), unique=True))
    # what I serve of a uid is at most what the swarm serves of it
    mine = {u: data.draw(st.sampled_from([0.0, 0.5, 1.0])) * rates[grid.index(u)] for u in mine_uids}
    swarm = dict(zip(grid, rates))
    types = {u: "small" if i % 2 else "large" for i, u in enumerate(grid)} if typed else None
    counts = data.draw(st.none() | st.fixed_dictionaries({u: st.integers(1, 3) for u in mine_uids}))

    moves = rebalance_moves(mine_uids, swarm, mine, margin, server_counts=counts, expert_types=types)
    assert moves == rebalance_moves(list(mine_uids), dict(swarm), dict(mine), margin, server_counts=counts,
                                    expert_types=types)  # deterministic
    assert len(moves.drop) == len(moves.take) == len(set(moves.drop)) == len(set(moves.take))
    assert set(moves.drop) <= set(mine_uids) and not set(moves.take) & set(mine_uids)
    for donor, target in zip(moves.drop, moves.take):
        assert swarm[donor] - mine[donor] > 0, "a uid I drop keeps another server"
        assert counts is None or counts[donor] >= 2
        assert types is None or types[donor] == types[target]
    after = coverage_after(swarm, mine, moves)
    if moves:
        # the coverage, weakest first, strictly improves: the minimum rises or fewer uids sit at it
        assert sorted(after.values()) > sorted(swarm.values())
        assert min(after.values()) >= min(swarm.values())
        weakest = [u for u in grid if swarm[u] == min(swarm.values())]
        if len(weakest) == 1 and weakest[0] in moves.take:
            assert min(after.values()) > min(swarm.values())


def test_rebalance_on_the_default_grid_fills_the_hole_it_can() -> None:
    uids = DEFAULT.all_uids()  # ffn0.* are "small", ffn1.* are "large"
    swarm = {uid: 800.0 for uid in uids} | {uids[3]: 0.0, uids[12]: 0.0}
    mine = {uids[0]: 300.0, uids[1]: 300.0, uids[2]: 300.0}
    types = {uid: DEFAULT.expert_type_of(uid).name for uid in uids}
    # my experts are all small: the large hole needs another volunteer; ties between donors go by uid
    assert rebalance_moves(mine, swarm, mine, expert_types=types) == Rebalance((uids[0],), (uids[3],))
    # without the type constraint both holes are filled
    assert rebalance_moves(mine, swarm, mine) == Rebalance((uids[0], uids[1]), (uids[3], uids[12]))
