"""``Device`` as a value, the choice of serving devices, and ``plan_volunteer`` as the one maker of a
placement (for ``VolunteerNode.start`` and ``volunteer hardware`` alike); pure, no GPU needed."""

from __future__ import annotations

import ast
import json
import os
import warnings
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter
from typer.testing import CliRunner

from tests.test_hardware import THREE, FakeCuda
from tests.test_sizing import BIG, CPU_DESKTOP, MACHINES, gpu_box
from volunteer.host.hardware import HardwareProfile

with warnings.catch_warnings():
    # hivemind's import-time torch.jit.script deprecation; see the same block in test_sizing.py
    warnings.simplefilter("ignore", DeprecationWarning)
    from volunteer.core.manifest import default_manifest
from volunteer.planning.choice import Plan, plan_experts
from volunteer.planning.devices import CPU, Device, ServingDevices, serving_devices
from volunteer.planning.memory import PlanCheck, SizingError
from volunteer.planning.placement import (
    Measuring,
    Placement,
    SwarmView,
    place_experts,
    plan_volunteer,
)

ROOT = Path(__file__).resolve().parent.parent
MIXED = MACHINES["gpu-24GB+6GB"]
NONE_VISIBLE = FakeCuda([], available=False)  # a CPU-only torch: whatever NVML lists, torch sees nothing


# --- Device --------------------------------------------------------------------------------------


def test_device_parses_and_prints_as_it_always_was_written() -> None:
    assert Device.parse("cpu") == CPU == Device("cpu") and str(CPU) == "cpu" and not CPU.is_gpu
    gpu = Device.parse("cuda:12")
    assert gpu == Device("cuda", 12) and gpu.index == 12 and gpu.is_gpu and str(gpu) == "cuda:12"
    assert sorted([Device("cuda", 1), CPU, Device("cuda", 0)]) == [CPU, Device("cuda", 0), Device("cuda", 1)]
    assert len({Device.parse("cuda:0"), Device("cuda", 0)}) == 1  # a value: usable as a dict key


@pytest.mark.parametrize("text", ["cuda", "cuda:", "cuda:-1", "cuda:1.0", "cuda:x", "CPU", "gpu:0", "cuda:١",
                                  " cpu", "cuda: 1", "", 0, None])
def test_device_refuses_anything_else(text: object) -> None:
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N") as info:
        Device.parse(text)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind, index", [("cpu", 0), ("cuda", None), ("cuda", -1), ("tpu", None), ("cuda", True)])
def test_device_cannot_be_built_wrong(kind: str, index: object) -> None:
    with pytest.raises(ValueError, match="a device is cpu or cuda:N"):
        Device(kind, index)  # type: ignore[arg-type]


@given(st.text(max_size=12))
def test_device_parse_either_round_trips_or_says_why(text: str) -> None:
    try:
        device = Device.parse(text)
    except ValueError as e:
        assert "device must be" in str(e)
    else:
        assert Device.parse(str(device)) == device
        assert str(device) == text or text.startswith("cuda:0")  # leading zeros: "cuda:01" is cuda:1


@given(st.one_of(st.just(CPU), st.integers(0, 2**31).map(lambda i: Device("cuda", i))))
def test_device_is_its_string_in_json(device: Device) -> None:
    adapter = TypeAdapter(Device)
    assert adapter.dump_python(device, mode="json") == str(device)
    assert adapter.validate_python(str(device)) == device == Device.parse(str(device))


def test_plans_keep_their_json_shape() -> None:
    plan = plan_experts(MIXED, BIG, {}, device="cuda:1")
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["device"] == "cuda:1" and isinstance(data["uids"], list)
    assert list(data) == ["device", "budget_bytes", "max_batch_size", "uids", "expert_types", "planned_bytes",
                          "reasons", "dtype", "reserve_bytes", "costs", "throughput"]
    assert Plan.from_dict(data) == plan
    placement = Placement((plan,), ("cuda:0 serves nothing: a note",))
    assert json.loads(json.dumps(placement.to_dict())) == {"plans": [data], "left_out": list(placement.left_out)}
    check = PlanCheck.of(plan, 0).to_dict()
    assert check["device"] == "cuda:1" and check["ratio"] == 0.0 and check["within_budget"] is True
    with pytest.raises(ValueError, match="device must be"):
        Plan.from_dict({**data, "device": "cuda"})


def test_a_check_of_nothing_planned_has_no_ratio_in_json() -> None:
    check = PlanCheck(CPU, 0, 5, 10, "basis")
    assert check.ratio == float("inf") and json.loads(json.dumps(check.to_dict()))["ratio"] is None


# --- the serving devices -------------------------------------------------------------------------


def test_serving_devices_leave_out_what_torch_cannot_see_and_say_why() -> None:
    both = [g.uuid.removeprefix("GPU-") for g in MIXED.gpus]
    assert serving_devices(MIXED, cuda=FakeCuda(both)) == ServingDevices((Device("cuda", 0), Device("cuda", 1)))
    hidden = serving_devices(MIXED, cuda=FakeCuda(both[1:]))
    assert hidden.devices == (Device("cuda", 1),) and hidden.left_out[0].startswith("cuda:0 (GPU 24 GB) serves")
    assert serving_devices(MIXED, cuda=NONE_VISIBLE).devices == (CPU,)


def test_for_torch_maps_each_device_now_and_fails_on_a_hidden_one() -> None:
    # CUDA_VISIBLE_DEVICES=2: NVML's GPU 2 is torch's cuda:0
    cuda = FakeCuda(["ffee0000-0000-0000-0000-000000000000"])
    named = serving_devices(THREE, gpus="2", cuda=cuda).for_torch(THREE, cuda)
    assert named.torch == {Device("cuda", 2): "cuda:0"} and named.torch_device(THREE, Device("cuda", 2)) == "cuda:0"
    with pytest.raises(ValueError, match="cuda:0 is not visible to torch"):
        serving_devices(THREE, "cuda:0", cuda=cuda).for_torch(THREE, cuda)
    assert serving_devices(MACHINES["cpu-2-cores-4GB"]).for_torch(MACHINES["cpu-2-cores-4GB"]).torch == {CPU: "cpu"}


# --- plan_volunteer ------------------------------------------------------------------------------


def test_plan_volunteer_places_with_what_the_swarm_says_and_keeps_every_note() -> None:
    counts = {uid: 1 for uid in BIG.all_uids()[::2]}
    swarm = SwarmView(counts, {uid: 5.0 for uid in counts}, seed=7)
    devices = ServingDevices((Device("cuda", 0), Device("cuda", 1)), ("cuda:2 (X) serves nothing: hidden",))
    placement = plan_volunteer(MIXED, BIG, devices, swarm=swarm, max_experts=50)
    expected = place_experts(MIXED, BIG, counts, devices=devices.devices, max_experts=50, seed=7,
                             served_throughput=swarm.served_throughput)
    assert placement.plans == expected.plans
    assert placement.left_out == devices.left_out + expected.left_out  # torch's notes first
    with pytest.raises(SizingError):
        plan_volunteer(HardwareProfile(CPU_DESKTOP, (gpu_box(0.6),)), BIG, ServingDevices((Device("cuda", 0),)))


def test_plan_volunteer_measures_on_the_torch_device_when_asked(tmp_path: Path) -> None:
    from tests.test_throughput import CPU as FAKE_CPU
    from tests.test_throughput import tiny

    manifest = tiny()
    devices = ServingDevices((CPU,), torch={CPU: "cpu"})
    plain = plan_volunteer(FAKE_CPU, manifest, devices, max_experts=1)
    assert all(not plan.throughput for plan in plain.plans)
    measured = plan_volunteer(FAKE_CPU, manifest, devices, max_experts=1, measuring=Measuring(tmp_path))
    [plan] = measured.plans
    assert plan.uids == plain.plans[0].uids and plan.throughput and not plan.throughput[0].cached
    again = plan_volunteer(FAKE_CPU, manifest, devices, max_experts=1, measuring=Measuring(tmp_path))
    assert again.plans[0].throughput[0].cached  # the cache under Measuring's folder
    fresh = plan_volunteer(FAKE_CPU, manifest, devices, max_experts=1, measuring=Measuring(tmp_path, remeasure=True))
    assert not fresh.plans[0].throughput[0].cached


def _calls(path: Path, function: str) -> set[str]:
    """The names called inside ``function`` (a function or method) of a module."""
    tree = ast.parse(path.read_text())
    found = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
    assert found, f"{function} not in {path}"
    return {getattr(c.func, "id", getattr(c.func, "attr", "")) for f in found for c in ast.walk(f)
            if isinstance(c, ast.Call)}


def test_the_node_and_the_hardware_command_both_plan_with_plan_volunteer() -> None:
    node = _calls(ROOT / "volunteer/node/node.py", "_place") | _calls(ROOT / "volunteer/node/node.py", "start")
    command = _calls(ROOT / "volunteer/cli.py", "hardware")
    for calls in (node, command):
        assert "plan_volunteer" in calls
        assert not calls & {"place_experts", "plan_experts", "measure_plan", "choose_devices"}


def test_volunteer_hardware_json_is_the_plan_a_node_would_make(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fake two-GPU machine: what `volunteer hardware --json` prints is ``plan_volunteer``'s placement
    for the same settings, with an empty swarm (a node adds what it read of the swarm, nothing else)."""
    from volunteer import cli
    from volunteer.host import hardware

    for name in [k for k in os.environ if k.startswith("VOLUNTEER_") and k != "VOLUNTEER_HOME"]:
        monkeypatch.delenv(name)
    fake = HardwareProfile(CPU_DESKTOP, (gpu_box(24, 0), gpu_box(6, 1)), None, "550.54.15", "12.4")
    monkeypatch.setattr(hardware, "detect_hardware", lambda: fake)
    result = CliRunner().invoke(cli.app, ["hardware", "--json", "--max-memory", "0.5", "--max-experts", "9"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    manifest = default_manifest()
    # the real torch here decides which fake GPUs it "sees": the same answer for both sides
    # the default serving path is the lean one: no TaskPool processes to plan for
    expected = plan_volunteer(fake, manifest, serving_devices(fake), max_memory=0.5, max_experts=9, task_pools=False)
    assert shown == {"hardware": fake.to_dict(), "experiment": manifest.name, **expected.to_dict()}
    assert Placement.from_dict(shown) == expected
