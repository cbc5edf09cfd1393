"""Unit tests of the figures: counters, rates, lifetime totals on disk, and the automatic pause reasons."""

from __future__ import annotations

import json
from datetime import datetime
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volunteer.config.settings import Settings
from volunteer.host.telemetry import CpuReading, GpuReading, Telemetry
from volunteer.node.limits import automatic_pause_reasons
from volunteer.node.stats import (
    LifetimeStore,
    NodeState,
    PlanView,
    RateMeter,
    StatsCollector,
    StatsSnapshot,
    Totals,
)
from volunteer.planning.choice import Plan
from volunteer.planning.devices import Device
from volunteer.planning.memory import PlanCheck
from volunteer.serving.counters import ExpertCounters


def test_counters_count_batches_samples_and_updates():
    counters = ExpertCounters("l.0", "small", optimizer_steps=5, params=1000)
    counters.record("forward", 8, 0.5)
    counters.record("forward", 2, 0.25)
    counters.record("backward", 8, 1.0)
    s = counters.snapshot()
    assert (s.forward_batches, s.forward_samples, s.backward_batches, s.backward_samples) == (2, 10, 1, 8)
    assert s.optimizer_steps == 6 and s.busy_seconds == pytest.approx(1.75)
    assert s.flops == 1000 * (2 * 10 + 6 * 8)


def test_rates_over_a_window_and_history():
    meter = RateMeter(horizon=60)
    for t in range(0, 31):
        meter.add(1000.0 + t, {"samples": 100 * t})
    assert meter.rate("samples", 10) == pytest.approx(100)
    assert meter.rate("missing", 10) == 0
    history = meter.history("samples", bucket=10)
    assert history and all(v == pytest.approx(100) for v in history)


def test_lifetime_totals_survive_a_corrupt_file_through_the_backup(tmp_path: Path):
    store = LifetimeStore(tmp_path / "lifetime.json")
    assert store.load() == Totals()
    store.save(Totals(forward_samples=10))
    store.save(Totals(forward_samples=20))
    (tmp_path / "lifetime.json").write_text("{not json")
    assert store.load().forward_samples == 10  # the copy kept before the last write
    assert any(p.name.startswith("lifetime.json.corrupt-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("bad", [[], {"forward_samples": -1}, {"flops": "many"}, {"busy_seconds": True}])
def test_totals_refuse_anything_but_non_negative_numbers(bad):
    with pytest.raises(ValueError):
        Totals.from_dict(bad)


def test_collector_lifetime_adds_the_session_and_never_goes_backwards(tmp_path: Path):
    store = LifetimeStore(tmp_path / "lifetime.json")
    store.save(Totals(forward_samples=100, backward_samples=50, uptime_seconds=10))
    counters = ExpertCounters("l.0", "small", params=10)
    collector = StatsCollector("exp", "peer", "cpu", [counters], store)
    counters.record("forward", 7, 0.1)
    saved = collector.persist()
    assert saved.forward_samples == 107 and saved.backward_samples == 50
    snapshot = collector.snapshot()
    assert snapshot.session.forward_samples == 7 and snapshot.lifetime.forward_samples == 107
    assert json.loads((tmp_path / "lifetime.json").read_text())["forward_samples"] == 107
    assert StatsSnapshot.from_dict(json.loads(json.dumps(snapshot.to_dict()))) == snapshot


def test_an_idle_collector_rewrites_its_totals_only_now_and_then(tmp_path: Path):
    from volunteer.node.stats import IDLE_SAVE_PERIOD

    path = tmp_path / "lifetime.json"
    store = LifetimeStore(path)
    counters = ExpertCounters("l.0", "small", params=10)
    collector = StatsCollector("exp", "peer", "cpu", [counters], store)
    collector.persist()
    written = path.read_text()  # the first one always writes
    collector.persist()
    assert path.read_text() == written  # nothing done, hardly any uptime: no write
    counters.record("backward", 3, 0.1)
    collector.persist()
    assert json.loads(path.read_text())["backward_samples"] == 3  # work: written at once
    written = path.read_text()
    collector.persist()
    assert path.read_text() == written  # idle again
    collector.started -= IDLE_SAVE_PERIOD + 1
    collector.persist()
    assert json.loads(path.read_text())["uptime_seconds"] > IDLE_SAVE_PERIOD  # the uptime, now and then
    written = path.read_text()
    collector.started -= 1  # one more second of uptime, and no work
    collector.persist(final=True)
    assert path.read_text() != written  # at stop, always


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["forward", "backward"]), st.integers(1, 512)), max_size=30))
def test_session_totals_are_the_sum_of_what_was_recorded(records):
    counters = ExpertCounters("l.0", "small", params=3)
    for kind, samples in records:
        counters.record(kind, samples, 0.001)
    totals = Totals.of([counters.snapshot()], uptime=1.0)
    assert totals.forward_samples == sum(n for k, n in records if k == "forward")
    assert totals.backward_samples == sum(n for k, n in records if k == "backward")
    assert totals.optimizer_steps == sum(1 for k, _ in records if k == "backward")


def _telemetry(temperature: float, others: int) -> Telemetry:
    cpu = CpuReading(2, 10.0, 0.5, 1, 2, 5.0, 1)
    return Telemetry(cpu, (GpuReading(0, "gpu", 50.0, 1, 2, temperature, 100.0, others),))


def test_automatic_pause_reasons():
    limits = Settings(run_hours="22-08", max_temp=80, pause_on_gpu_use=True)
    night, noon = datetime(2026, 1, 1, 23), datetime(2026, 1, 1, 12)
    assert automatic_pause_reasons(limits, _telemetry(60, 0), night) == dict(schedule=None, temperature=None,
                                                                             gpu_in_use=None)
    reasons = automatic_pause_reasons(limits, _telemetry(85, 1), noon)
    assert reasons["schedule"] == "outside the run hours 22-08"
    assert reasons["temperature"] == "GPU 0 at 85 C, above 80 C"
    assert reasons["gpu_in_use"] == "another program is using GPU 0"
    # no limits set: nothing ever pauses, with or without telemetry
    assert not any(automatic_pause_reasons(Settings(), _telemetry(99, 3), noon).values())
    assert not any(automatic_pause_reasons(limits, None, night).values())
    # serving on GPU 1 only, GPU 0's heat and its game are no reason to pause; serving on GPU 0 they are
    assert automatic_pause_reasons(limits, _telemetry(85, 1), night, serving_gpus={1})["gpu_in_use"] is None
    assert automatic_pause_reasons(limits, _telemetry(85, 1), night, serving_gpus={1})["temperature"] is None
    assert automatic_pause_reasons(limits, _telemetry(85, 1), night, serving_gpus={0, 1})["temperature"]


def test_a_snapshot_keeps_the_state_strings_and_refuses_bad_totals_in_one_line(tmp_path: Path):
    collector = StatsCollector("exp", "peer", "cpu", [ExpertCounters("l.0", "small")], LifetimeStore(tmp_path / "l.json"))
    data = json.loads(json.dumps(collector.snapshot(NodeState.PAUSED, ("paused by the user",)).to_dict()))
    assert data["state"] == "paused" and data["pause_reasons"] == ["paused by the user"]
    assert StatsSnapshot.from_dict(data).state is NodeState.PAUSED
    for bad in ({**data, "session": {**data["session"], "flops": -1}}, {**data, "state": "dancing"}):
        with pytest.raises(ValueError) as refused:
            StatsSnapshot.from_dict(bad)
        assert "\n" not in str(refused.value)


def test_a_snapshots_plans_are_flat_objects_in_json_and_typed_again_when_read(tmp_path: Path):
    """Each plan is the plan's own fields, plus the measured peak and the check once telemetry has read the
    device: the status JSON's shape; ``from_dict`` makes typed ``PlanView``s of it again, and refuses a broken one."""
    plan = Plan(device=Device.parse("cuda:1"), budget_bytes=8 << 30, max_batch_size=64, uids=("l.0", "l.1"),
                expert_types=("small", "small"), planned_bytes=3 << 30, reasons=("fits",), reserve_bytes=1 << 30)
    checked = PlanView(plan, PlanCheck.of(plan, 5 << 30))
    collector = StatsCollector("exp", "peer", "cuda:1", [], LifetimeStore(tmp_path / "l.json"), [PlanView(plan)])
    for views in ((PlanView(plan),), (checked,)):
        collector.fold(plans=views)
        snapshot = collector.snapshot(NodeState.SERVING)
        data = json.loads(json.dumps(snapshot.to_dict()))
        [flat] = data["plans"]
        check = {"measured_peak_bytes": 5 << 30, "plan_check": checked.check.to_dict()} if views[0].check else {}
        assert flat == {**plan.to_dict(), **check}
        assert StatsSnapshot.from_dict(data) == snapshot
    assert StatsSnapshot.from_dict(data).plans[0].measured_peak_bytes == 5 << 30
    with pytest.raises(ValueError) as refused:
        StatsSnapshot.from_dict({**data, "plans": [{**flat, "budget_bytes": "lots"}]})
    assert refused.value.args[0].startswith("plans.0")


class _FakeNode:
    """What ``Pauser`` drives (``limits.Pausable``), recording the calls."""

    def __init__(self):
        self.state, self.pause_reasons, self.calls = NodeState.SERVING, (), []

    def pause(self, reasons):
        self.state, self.pause_reasons = NodeState.PAUSED, reasons
        self.calls.append("pause")

    def resume(self):
        self.state, self.pause_reasons = NodeState.SERVING, ()
        self.calls.append("resume")

    def begin_drain(self):
        self.state = NodeState.DRAINING


def test_the_pauser_pauses_while_a_reason_holds_and_not_after_the_drain():
    from volunteer.node.limits import Pauser

    node, events = _FakeNode(), []
    pauser = Pauser(node, Settings(), lambda kind, message, **fields: events.append(message))
    pauser.set("user", "paused by the user")
    pauser.set("schedule", "outside the run hours 22-08")
    assert node.state is NodeState.PAUSED and node.pause_reasons == ("paused by the user", "outside the run hours 22-08")
    pauser.update(dict(user=None, schedule=None))
    assert node.state is NodeState.SERVING and node.calls == ["pause", "pause", "resume"]
    assert events == ["paused: paused by the user", "still paused: paused by the user; outside the run hours 22-08",
                      "resumed serving"]
    pauser.freeze()
    pauser.set("user", "paused by the user")
    assert node.state is NodeState.DRAINING and node.calls[-1] == "resume"


def test_headless_telemetry_is_read_once_a_stats_line_unless_a_limit_needs_it():
    """Idle CPU (issue 16): nobody watching and no GPU limit, the readings only go into the stats lines."""
    from types import SimpleNamespace

    from volunteer.node.supervisor import TELEMETRY_PERIOD, _telemetry_period

    quiet = SimpleNamespace(max_temp=None, pause_on_gpu_use=False, log_interval=10.0)
    assert _telemetry_period(quiet, watched=False) == 10.0
    assert _telemetry_period(quiet, watched=True) == TELEMETRY_PERIOD  # the dashboard shows them live
    for limit in (dict(max_temp=80.0), dict(pause_on_gpu_use=True)):  # heat and games are checked on them
        assert _telemetry_period(SimpleNamespace(**{**vars(quiet), **limit}), watched=False) == TELEMETRY_PERIOD


def test_the_limits_poll_runs_only_when_a_limit_is_set():
    """Idle CPU (issue 16): with no limit set no automatic reason can come up (test above), so no poll."""
    from volunteer.node.supervisor import _has_limits

    assert not _has_limits(Settings())
    for limit in (dict(run_hours="22-08"), dict(max_temp=80), dict(pause_on_gpu_use=True)):
        assert _has_limits(Settings(**limit))


def test_an_inline_poll_runs_on_the_loop_thread():
    import threading

    import trio

    from volunteer.node.pollers import every

    threads: list[int] = []

    async def main() -> None:
        with trio.move_on_after(10):  # a bound, not a timing: three polls take ~20 ms
            async with trio.open_nursery() as nursery:
                def poll() -> None:
                    threads.append(threading.get_ident())
                    if len(threads) == 3:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(partial(every, 0.01, poll, first=0, inline=True))

    trio.run(main)
    assert threads == [threading.get_ident()] * 3
