"""Several devices: which ones serve, what each holds, and one node serving on two at once.

The placement tests are pure (hardware profiles from the machine table in fakes.py). The last test starts a real
node on loopback with two GPUs in its hardware profile whose torch devices are both the CPU: the
placement, the per-device Runtime threads, the serving path and the stats are the real ones; only
the kernels run on the CPU instead of two GPUs.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hivemind.moe import get_experts

from tests.conftest import wait_for
from tests.fakes import (
    BIG,
    CPU_DESKTOP,
    DEFAULT,
    MACHINES,
    FakeCuda,
    MiB,
    check_plan,
    gpu_box,
)
from volunteer.host.hardware import HardwareProfile, detect_cpu
from volunteer.planning.choice import plan_experts
from volunteer.planning.devices import Device, choose_devices, pick_devices
from volunteer.planning.memory import SizingError
from volunteer.planning.placement import Placement, place_experts

MIXED = MACHINES["gpu-24GB+6GB"]


def place(hardware: HardwareProfile, manifest=BIG, counts=None, *, device=None, gpus=None, **kwargs) -> Placement:
    return place_experts(hardware, manifest, counts or {}, devices=pick_devices(hardware, device, gpus), **kwargs)


def names(devices: tuple[Device, ...]) -> tuple[str, ...]:
    return tuple(map(str, devices))


def chosen(*args, **kwargs) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``choose_devices`` with the devices by name."""
    devices, notes = choose_devices(*args, **kwargs)
    return names(devices), notes


def check_placement(manifest, placement: Placement, counts: dict[str, int]) -> None:
    """Each plan keeps every sizing invariant, and no uid is placed twice."""
    for plan in placement.plans:
        check_plan(manifest, plan, counts)
    assert len(set(placement.uids)) == len(placement.uids)
    assert len(set(placement.devices)) == len(placement.devices)


# --- which devices -------------------------------------------------------------------------------


def test_every_gpu_serves_by_default_the_biggest_first() -> None:
    assert pick_devices(MIXED) == pick_devices(MIXED, "auto") == pick_devices(MIXED, "cuda")
    assert names(pick_devices(MIXED)) == ("cuda:0", "cuda:1")
    small_first = HardwareProfile(CPU_DESKTOP, (gpu_box(6, 0), gpu_box(24, 1)))
    assert names(pick_devices(small_first)) == ("cuda:1", "cuda:0")
    assert names(pick_devices(MACHINES["cpu-2-cores-4GB"])) == ("cpu",)


def test_device_and_gpus_options_choose_devices() -> None:
    assert names(pick_devices(MIXED, "cpu")) == ("cpu",)
    assert names(pick_devices(MIXED, "cuda:1")) == ("cuda:1",)
    assert names(pick_devices(MIXED, gpus="1,0")) == ("cuda:1", "cuda:0")
    assert names(pick_devices(MIXED, gpus="GPU-1")) == ("cuda:1",)  # a UUID (or a prefix that names one GPU)
    with pytest.raises(ValueError, match="both choose devices"):
        pick_devices(MIXED, "cpu", gpus="0")
    with pytest.raises(ValueError, match="'7' is not a GPU of this machine"):
        pick_devices(MIXED, gpus="0,7")
    with pytest.raises(ValueError, match="no GPU was found"):
        pick_devices(MACHINES["cpu-2-cores-4GB"], gpus="0")
    with pytest.raises(ValueError, match="device cuda requested but no GPU was found"):
        pick_devices(MACHINES["cpu-2-cores-4GB"], "cuda")


def test_gpus_torch_cannot_see_are_left_out_of_the_default_choice() -> None:
    both = [g.uuid.removeprefix("GPU-") for g in MIXED.gpus]
    assert chosen(MIXED, cuda=FakeCuda(both)) == (("cuda:0", "cuda:1"), ())
    # CUDA_VISIBLE_DEVICES=1: torch sees one of the two
    devices, notes = chosen(MIXED, cuda=FakeCuda(both[1:]))
    assert devices == ("cuda:1",)
    assert notes == ("cuda:0 (GPU 24 GB) serves nothing: torch cannot see it (a CPU-only torch build, or "
                     "CUDA_VISIBLE_DEVICES)",)
    # a CPU-only torch on a GPU box: the CPU serves, and both GPUs are said to be left out
    devices, notes = chosen(MIXED, cuda=FakeCuda(both, available=False))
    assert devices == ("cpu",) and len(notes) == 2
    # a GPU the owner named is not second-guessed: it fails loudly when mapped for torch
    assert chosen(MIXED, gpus="0", cuda=FakeCuda(both[1:])) == (("cuda:0",), ())
    assert chosen(MIXED, "cuda:0", cuda=FakeCuda(both[1:])) == (("cuda:0",), ())
    assert chosen(MIXED, "cuda", cuda=FakeCuda(both, available=False)) == (("cuda:0", "cuda:1"), ())


# --- what each device holds ----------------------------------------------------------------------


def test_two_mixed_gpus_each_get_a_plan_of_their_own() -> None:
    placement = place(MIXED)
    check_placement(BIG, placement, {})
    big, small = placement.plans
    assert (big.device, small.device) == (Device("cuda", 0), Device("cuda", 1))
    assert placement.device == "cuda:0,cuda:1"
    # each within its own GPU's budget, and the 24 GB card holds more than the 6 GB one
    assert big.budget_bytes > small.budget_bytes and big.planned_bytes > small.planned_bytes
    assert len(big.uids) > len(small.uids) > 0
    # the first GPU's plan is what it would be alone; the second picks among the uids left
    assert big == plan_experts(MACHINES["gpu-24GB"], BIG, {})
    assert small == plan_experts(MIXED, BIG, {}, device="cuda:1", exclude=big.uids)
    # two GPUs host more than the bigger one alone
    assert len(placement.uids) > len(plan_experts(MACHINES["gpu-24GB"], BIG, {}).uids)
    assert place(MIXED) == placement  # deterministic


def test_every_gpu_picks_from_the_unserved_uids_first() -> None:
    served_once = {uid: 1 for uid in BIG.all_uids()[::2]}  # half of each layer has a server already
    placement = place(MIXED, counts=served_once)
    check_placement(BIG, placement, served_once)
    assert not set(placement.uids) & set(served_once)  # 42 experts in all, 256 unserved uids to pick from


def test_a_small_grid_leaves_the_second_gpu_out_and_says_why() -> None:
    placement = place(MIXED, DEFAULT)
    assert names(placement.devices) == ("cuda:0",) and sorted(placement.uids) == sorted(DEFAULT.all_uids())
    assert placement.left_out == ("cuda:1 serves nothing: every uid of 'tiny-stdlib-lm' is placed already",)


def test_max_experts_caps_the_volunteer_not_each_gpu() -> None:
    capped = place(MIXED, max_experts=3)
    assert len(capped.uids) == 3 and names(capped.devices) == ("cuda:0",)
    assert capped.left_out == ("cuda:1 serves nothing: the 3 experts of max_experts are placed",)


def test_max_memory_applies_to_each_gpu() -> None:
    placement = place(MIXED, max_memory=0.5)
    for plan in placement.plans:
        gpu = MIXED.gpus[plan.device.index]
        assert plan.budget_bytes == int(0.5 * gpu.memory_free) >= plan.planned_bytes


def test_a_gpu_too_small_for_one_expert_is_left_out() -> None:
    tiny = dataclasses.replace(gpu_box(1, 1), memory_free=600 * MiB)  # the CUDA reserve alone is 512 MiB
    hardware = HardwareProfile(CPU_DESKTOP, (gpu_box(24, 0), tiny))
    placement = place(hardware)
    assert names(placement.devices) == ("cuda:0",)
    [note] = placement.left_out
    assert note.startswith("cuda:1 serves nothing: one 'small' expert needs") and "\n" not in note
    with pytest.raises(SizingError, match="one 'small' expert needs"):
        place(HardwareProfile(CPU_DESKTOP, (tiny,)))


def test_placement_round_trips_through_json() -> None:
    placement = place(MIXED, DEFAULT)
    assert Placement.from_dict(placement.to_dict()) == placement


# --- one node, two devices -----------------------------------------------------------------------


@pytest.mark.integration
def test_a_node_serves_on_two_devices_with_a_runtime_each(seed, client) -> None:
    from volunteer.config.settings import Settings
    from volunteer.core.paths import default_paths
    from volunteer.node.node import VolunteerNode

    _url, experiment = seed
    manifest = experiment.manifest
    gpus = tuple(dataclasses.replace(gpu_box(24, i), name="Fake GPU") for i in range(2))
    hardware = HardwareProfile(detect_cpu(), gpus)
    # room for the CUDA reserve and five of the test manifest's experts on each "GPU": 8 uids split 5 + 3
    settings = Settings(host="127.0.0.1", max_memory=700 * MiB, num_handlers=1, rebalance_period=0)
    node = VolunteerNode(settings, default_paths().ensure(), experiment)
    runtimes = None
    try:
        info = node.start(hardware, torch_devices={Device("cuda", 0): "cpu", Device("cuda", 1): "cpu"})
        first, second = info.placement.plans
        assert (len(first.uids), len(second.uids)) == (5, 3) and sorted(info.uids) == sorted(manifest.all_uids())
        runtimes = node.server.workers  # the lean path: one worker thread per device
        assert len(runtimes) == 2
        assert [set(w.backends) for w in runtimes] == [set(first.uids), set(second.uids)]
        assert all(w.is_alive() for w in runtimes)
        node.report_serving()

        # one expert on each device, called by a plain hivemind client: each answers only if its
        # device's worker thread runs
        for uid in (first.uids[0], second.uids[0]):
            [expert] = wait_for(lambda: get_experts(client, [uid]), 30, f"{uid} in the DHT")
            x = torch.randn(3, manifest.d_model, requires_grad=True)

            def forward_backward():
                y = expert(x)
                y.sum().backward()
                return y

            pool = ThreadPoolExecutor(1)  # a bare RemoteExpert call has no timeout of its own
            try:
                y = pool.submit(forward_backward).result(timeout=30)
            finally:
                pool.shutdown(wait=False)  # a hung call ends when the node shuts down below
            assert torch.isfinite(y).all() and x.grad is not None
        experts = {e.stats.uid: e.stats for e in node.collector.snapshot().experts}
        for uid in (first.uids[0], second.uids[0]):
            assert (experts[uid].forward_samples, experts[uid].backward_samples, experts[uid].optimizer_steps) == (3, 3, 1)
        assert node.samples_per_second == pytest.approx(sum(
            sum(t.samples_per_second for t in plan.throughput) / len(plan.throughput) for plan in info.placement.plans
        ))
        assert len(node.check_plans()) == 2
    finally:
        node.shutdown()
    assert runtimes is not None and not any(w.is_alive() for w in runtimes)
