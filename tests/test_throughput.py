"""Measured throughput and peak memory, on real tiny experts on the CPU; the cache; the report."""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from volunteer.host.hardware import CPUInfo, GPUInfo, GPUProcess, HardwareProfile

with warnings.catch_warnings():
    # hivemind's import-time torch.jit.script deprecation; see the same block in test_sizing.py
    warnings.simplefilter("ignore", DeprecationWarning)
    from volunteer.core.manifest import Manifest, default_manifest
from volunteer.planning import throughput
from volunteer.planning.choice import measure_plan, plan_experts
from volunteer.planning.devices import Device, device_name
from volunteer.planning.memory import (
    CPU_EXPERT_OVERHEAD,
    GPU_EXPERT_OVERHEAD,
    PlanCheck,
    expert_cost,
)
from volunteer.planning.placement import Placement
from volunteer.planning.throughput import (
    Throughput,
    candidate_batches,
    measure_rates,
    measure_throughput,
    measured_peak,
    pick_batch,
)
from volunteer.serving.experts import build_expert, build_optimizer
from volunteer.views.report import print_hardware_and_placement

GiB = 2**30
FAST = 0.05  # seconds per expert type: enough for a few steps of a tiny expert, fast on a 2-core box


def tiny(d_hidden: int = 16, optimizer: str = "adam", max_batch: int = 64) -> Manifest:
    return Manifest.from_dict({
        "schema_version": 1, "name": "tiny", "dht_prefix": "tiny", "d_model": 8, "max_batch_size": max_batch,
        "optimizer": {"name": optimizer, "lr": 0.01},
        "expert_types": [{"name": "t", "block": "residual_ffn", "d_hidden": d_hidden}],
        "layers": [{"uid_prefix": "tiny_ffn0", "grid": [2], "expert_type": "t"}],
    })


CPU = HardwareProfile(CPUInfo(2, 4 * GiB, 3 * GiB, "Fake CPU"), (), "NVML not found")


def measure(cache: Path, manifest: Manifest | None = None, **kwargs) -> Throughput:
    results = measure_throughput(manifest or tiny(), cache, device_name="Fake CPU (2 cores)", time_budget=FAST,
                                 **kwargs)
    assert len(results) == 1
    return results[0]


# --- choosing the batch --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cap, batches",
    [(1024, (16, 64, 256)), (256, (16, 64, 256)), (100, (16, 64, 100)), (16, (16,)), (8, (8,)), (1, (1,))],
)
def test_candidate_batches_are_capped_by_the_plan(cap: int, batches: tuple[int, ...]) -> None:
    assert candidate_batches(cap) == batches


def test_the_smallest_batch_within_ninety_percent_of_the_best_wins() -> None:
    assert pick_batch({16: 100.0, 64: 950.0, 256: 1000.0}) == (64, 950.0)
    assert pick_batch({16: 100.0, 64: 850.0, 256: 1000.0}) == (256, 1000.0)
    assert pick_batch({16: 500.0, 64: 400.0}) == (16, 500.0)  # bigger is not always better on a small CPU


# --- measuring -----------------------------------------------------------------------------------


def test_rates_of_a_real_expert_at_each_batch() -> None:
    # a generous budget for two tiny batches, so that a busy CI box still measures both
    rates = measure_rates("swiglu_ffn", 8, 16, "sgd", batch_sizes=(4, 8), time_budget=1.0)
    assert set(rates) == {4, 8} and all(rate > 0 for rate in rates.values())


def test_a_slow_device_skips_the_larger_batches() -> None:
    ticks = iter(range(0, 10_000, 10))  # every reading of the clock is 10 s later: one step blows the budget
    rates = measure_rates("residual_ffn", 8, 16, "adam", batch_sizes=(4, 8, 16), time_budget=1.0,
                          clock=lambda: float(next(ticks)))
    assert list(rates) == [4]


def test_cache_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = measure(tmp_path)
    assert not first.cached and first.device == "Fake CPU (2 cores)" and first.expert_type == "t"
    # 64 too, unless a busy box spent the budget on 16
    assert 16 in first.by_batch and set(first.by_batch) <= {16, 64} and first.best_batch_size in first.by_batch
    assert first.samples_per_second == first.by_batch[first.best_batch_size] > 0
    monkeypatch.setattr(throughput, "measure_rates", lambda *a, **k: pytest.fail("measured instead of reading"))
    second = measure(tmp_path)
    assert second.cached and replace(second, cached=False) == first


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"manifest": tiny(d_hidden=32)}, id="d_hidden"),
        pytest.param({"manifest": tiny(optimizer="sgd")}, id="optimizer"),
        pytest.param({"max_batch": 16}, id="batch-cap"),
        pytest.param({"dtype": "bfloat16"}, id="dtype"),
    ],
)
def test_cache_miss_on_a_changed_spec(tmp_path: Path, change: dict) -> None:
    measure(tmp_path)
    assert not measure(tmp_path, **change).cached
    assert measure(tmp_path, **change).cached  # and that one is cached in turn
    assert len(list((tmp_path / "throughput").glob("*.json"))) == 2


def test_cache_miss_on_another_device_or_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measure(tmp_path)
    other = measure_throughput(tiny(), tmp_path, device_name="Other CPU (64 cores)", time_budget=FAST)[0]
    assert not other.cached and other.device == "Other CPU (64 cores)"
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert not measure(tmp_path).cached


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"key": 1}', ""])
def test_a_corrupt_cache_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: str
) -> None:
    measure(tmp_path)
    (path,) = (tmp_path / "throughput").glob("*.json")
    path.write_text(garbage)
    with caplog.at_level(logging.WARNING, logger="volunteer.planning.throughput"):
        again = measure(tmp_path)
    assert not again.cached
    assert any("corrupt" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text())["result"]["expert_type"] == "t"  # rewritten whole
    assert measure(tmp_path).cached


def test_remeasure_ignores_and_refreshes_the_cache(tmp_path: Path) -> None:
    measure(tmp_path)
    (path,) = (tmp_path / "throughput").glob("*.json")
    before = path.read_text()
    fresh = measure(tmp_path, remeasure=True)
    assert not fresh.cached and path.read_text() != before


def test_an_unwritable_cache_still_measures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache dir should be
    with caplog.at_level(logging.WARNING, logger="volunteer.planning.throughput"):
        assert measure(blocker).samples_per_second > 0
    assert any("could not cache" in r.getMessage() for r in caplog.records)


def test_measure_plan_records_throughput_for_the_types_it_uses(tmp_path: Path) -> None:
    manifest = default_manifest()
    plan = plan_experts(CPU, manifest, {}, max_experts=1)
    measured = measure_plan(CPU, manifest, plan, tmp_path, time_budget=FAST)
    assert [t.expert_type for t in measured.throughput] == list(plan.expert_types)
    assert all(t.best_batch_size <= plan.max_batch_size and t.device == "Fake CPU (2 cores)"
               for t in measured.throughput)
    assert measured.uids == plan.uids and len(measured.reasons) == len(plan.reasons) + 1


def test_device_names() -> None:
    gpus = HardwareProfile(CPU.cpu, (GPUInfo(0, "NVIDIA GeForce RTX 3060", "GPU-a", 12 * GiB, 11 * GiB),))
    assert device_name(gpus, Device("cuda", 0)) == "NVIDIA GeForce RTX 3060"
    assert device_name(gpus, Device("cpu")) == "Fake CPU (2 cores)"
    with pytest.raises(ValueError, match="cuda:1"):
        device_name(gpus, Device("cuda", 1))


def test_bad_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        measure(tmp_path, dtype="int8")


# --- peak memory against the plan ----------------------------------------------------------------


def test_measured_peak_reads_the_high_water_mark(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 900000 kB\nVmHWM:\t  400000 kB\nVmRSS:\t  300000 kB\n")
    assert measured_peak("cpu", status) == 400000 * 1024
    status.write_text("Name:\tpython\nVmRSS:\t  300000 kB\n")  # some kernels' containers lack VmHWM
    assert measured_peak("cpu", status) == 300000 * 1024
    assert measured_peak("cpu", tmp_path / "missing") > 0  # getrusage
    assert measured_peak("cpu") > 10 * 2**20  # this very process: torch alone is more than that


def test_plan_check_compares_like_with_like() -> None:
    cpu_plan = plan_experts(CPU, default_manifest(), {})
    check = PlanCheck.of(cpu_plan, 500 * 2**20)
    assert check.planned_bytes == cpu_plan.planned_bytes and check.within_budget
    assert check.ratio == pytest.approx(500 * 2**20 / cpu_plan.planned_bytes)
    gpu = HardwareProfile(CPU.cpu, (GPUInfo(0, "GPU", "GPU-a", 24 * GiB, 20 * GiB),))
    gpu_plan = plan_experts(gpu, default_manifest(), {})
    gpu_check = PlanCheck.of(gpu_plan, gpu_plan.tensor_bytes * 2)
    # torch.cuda.max_memory_allocated sees tensors only: the reserves are not in the comparison
    assert gpu_check.planned_bytes == gpu_plan.planned_bytes - 512 * 2**20 - len(gpu_plan.uids) * GPU_EXPERT_OVERHEAD
    assert gpu_check.ratio == 2.0 and "max_memory_allocated" in gpu_check.basis
    over = PlanCheck.of(cpu_plan, cpu_plan.budget_bytes + 1)
    assert not over.within_budget and json.loads(json.dumps(over.to_dict()))["within_budget"] is False


@pytest.mark.parametrize("type_name", ["small", "large"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_cost_model_covers_a_real_expert(type_name: str, optimizer: str) -> None:
    """Weights, grads and optimizer state exactly; activations: what autograd saves, never more than planned."""
    manifest = Manifest.from_dict({**default_manifest().to_dict(), "optimizer": {"name": optimizer, "lr": 0.01}})
    expert_type, batch = manifest.expert_type(type_name), 32
    cost = expert_cost(manifest, expert_type, batch, "cpu")
    module = build_expert(expert_type.block, manifest.d_model, expert_type.d_hidden, seed=0)
    opt = build_optimizer(optimizer, module.parameters(), lr=0.01)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}  # by storage: chunk() views share one (SwiGLU's gate and up)

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # the weights autograd keeps are counted as weights
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = module(torch.randn(batch, manifest.d_model, requires_grad=True))
    out.backward(torch.randn_like(out))
    grads = sum(p.grad.nbytes for p in module.parameters())
    opt.step()
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    assert (cost.weights, cost.grads, cost.optimizer) == (sum(p.nbytes for p in module.parameters()), grads, state)
    # the plan counts activations twice (hivemind's backward recomputes the forward) and rounds up
    assert 0.5 * cost.activations / 2 <= sum(saved.values()) <= cost.activations / 2
    assert cost.overhead == CPU_EXPERT_OVERHEAD


# --- the report ----------------------------------------------------------------------------------


def render(profile: HardwareProfile, manifest: Manifest, plan, check=None) -> str:
    out = io.StringIO()
    print_hardware_and_placement(profile, manifest, Placement((plan,)), Console(file=out, width=160, color_system=None),
                                 checks=[check] if check else [])
    return out.getvalue()


def test_report_explains_budget_costs_throughput_and_uids() -> None:
    manifest = default_manifest()
    plan = plan_experts(CPU, manifest, {}).with_throughput(
        [Throughput("small", "Fake CPU (2 cores)", 64, 12345.0, {16: 5000.0, 64: 12345.0})]
    )
    text = render(CPU, manifest, plan, PlanCheck.of(plan, 400 * 2**20))
    assert "Plan for tiny-stdlib-lm on cpu: 4 experts" in text
    assert "Cost of one expert at batch 1024 in float32" in text
    assert "small" in text and "residual_ffn 256" in text and "33,216" in text
    assert "12,345 (64)" in text and "not measured" in text  # "large" has no measurement
    assert "budget" in text and " ".join(plan.uids) in text
    assert "measured 400 MiB vs planned" in text and "within budget" in text
    assert "no GPU: NVML not found" in text


def test_report_shows_drivers_and_who_else_uses_a_gpu() -> None:
    gpu = GPUInfo(0, "NVIDIA GeForce RTX 3060", "GPU-a", 12 * GiB, 10 * GiB, 5.0, 40.0, 30.0, (8, 6),
                  (GPUProcess(1200, 200 * 2**20, "/usr/lib/xorg/Xorg", "graphics"), GPUProcess(777, None)))
    profile = HardwareProfile(CPU.cpu, (gpu,), None, "550.54.15", "12.4")
    text = render(profile, default_manifest(), plan_experts(profile, default_manifest(), {}))
    assert "NVIDIA driver 550.54.15, CUDA 12.4" in text and "sm 8.6" in text
    assert "cuda:0 is shared with 2 processes: /usr/lib/xorg/Xorg (1200, 200 MiB), pid (777)" in text
