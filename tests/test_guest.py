"""A good guest: pause and resume, a graceful drain under load, and kill -9 at random moments.

Real processes on loopback: a seed, `volunteer start` processes, a trainer or a plain hivemind client.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hivemind.moe import get_experts

from coordinator_seeds.trainer import TrainerSettings, train
from tests.conftest import cli, serving_event, status, wait_for
from volunteer.core.harness import start_volunteer
from volunteer.serving.checkpoints import CheckpointStore

pytestmark = pytest.mark.integration


def lookup(dht, uid: str):
    [expert] = get_experts(dht, [uid], expiration_time=float("inf"))  # no cached record
    return expert


def test_pause_refuses_work_hides_from_trainers_and_resumes_without_reloading(seed, client, short_home, processes):
    url, experiment = seed
    volunteer = processes.add(start_volunteer(short_home, url, "--max-experts", "2", "--power", "medium",
                                              "--cpu-threads", "1", name="paused"))
    uid = serving_event(volunteer)["uids"][0]
    x = torch.randn(4, experiment.manifest.d_model)
    expert = wait_for(lambda: lookup(client, uid), 20, f"{uid} in the DHT")  # what a trainer holds
    with torch.no_grad():
        before = expert(x)

    paused = cli(short_home, "pause")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == "paused (paused by the user)"
    figures = status(short_home)
    assert figures["state"] == "paused" and figures["pause_reasons"] == ["paused by the user"]
    assert figures["limits"]["power"] == "medium" and figures["limits"]["cpu_threads"] == 1

    # a caller that still holds the old address is refused at once, and nothing is counted
    started = time.monotonic()
    with pytest.raises(Exception, match="paused"):
        with torch.no_grad():
            expert(x)
    assert time.monotonic() - started < 5
    assert status(short_home)["session"]["forward_samples"] == 4
    # and the experts are hidden from new lookups, so trainers route elsewhere
    wait_for(lambda: lookup(client, uid) is None, 20, f"{uid} to disappear from the DHT")

    resumed = cli(short_home, "resume")
    assert resumed.returncode == 0 and resumed.stdout.strip() == "serving", resumed.stderr
    with torch.no_grad():
        after = wait_for(lambda: lookup(client, uid), 20, f"{uid} back in the DHT")(x)
    assert torch.equal(before, after), "resuming must keep the weights in memory, not rebuild them"
    assert status(short_home)["state"] == "serving"
    assert cli(short_home, "stop").returncode == 0
    assert volunteer.proc.wait(timeout=60) == 0


class FailedCalls(logging.Handler):
    """The trainer's 'expert ... failed' warnings, with the time each was logged."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.failures: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "failed" in record.getMessage():
            self.failures.append((record.created, record.getMessage()))


def _train_in_background(experiment, stop: threading.Event, steps: list) -> threading.Thread:
    settings = TrainerSettings(experiment.manifest, experiment.initial_peers, steps=None, log_every=1000,
                               forward_timeout=5.0, backward_timeout=5.0, publish_progress=False)
    thread = threading.Thread(target=train, args=(settings,), kwargs=dict(stop=stop, on_step=steps.append),
                              daemon=True)
    thread.start()
    return thread


def test_sigterm_under_load_drains_within_the_bound(seed, short_home, tmp_path, processes):
    url, experiment = seed
    other = processes.add(start_volunteer(tmp_path / "other", url, "--max-experts", "4", name="other"))
    serving_event(other)
    leaving = processes.add(start_volunteer(short_home, url, "--max-experts", "4", name="leaving"))
    leaving_uids = set(serving_event(leaving)["uids"])

    failed = FailedCalls()
    logging.getLogger("coordinator_seeds").addHandler(failed)
    stop, steps = threading.Event(), []
    trainer = _train_in_background(experiment, stop, steps)
    try:
        wait_for(lambda: len(steps) >= 10, 120, "ten training steps")
        served_before = status(short_home)["session"]["backward_samples"]
        assert served_before > 0, "the leaving volunteer must be under load"

        started = time.monotonic()
        leaving.proc.send_signal(signal.SIGTERM)
        code = leaving.proc.wait(timeout=60)
        took = time.monotonic() - started
        steps_at_exit = len(steps)
        wait_for(lambda: len(steps) >= steps_at_exit + 10, 60, "ten more steps after the volunteer left")
    finally:
        stop.set()
        trainer.join(timeout=60)
        logging.getLogger("coordinator_seeds").removeHandler(failed)
    assert code == 0, leaving.tail(20)
    print(f"drain under load took {took:.1f} s")
    assert took < 35, f"drain took {took:.1f} s"  # DRAIN_TIMEOUT 20 s + checkpoint and shutdown
    events = [json.loads(line) for line in leaving.output if line.startswith('{"event"')]
    names = [e["event"] for e in events]
    assert names.index("draining") < names.index("stopped")
    theirs = [message for _, message in failed.failures if any(uid in message for uid in leaving_uids)]
    assert not theirs, f"the trainer saw errors from the drained volunteer: {theirs}"
    store = CheckpointStore(short_home / "data" / "checkpoints" / experiment.manifest.name)
    for uid in leaving_uids:
        assert store.load(uid, experiment.manifest.expert_type_of(uid).name) is not None


def test_kill_9_at_random_moments_under_load(seed, short_home, processes):
    """Each restart serves again, from loadable checkpoints, and lifetime totals never go backwards."""
    url, experiment = seed
    rng = random.Random(1234)
    stop, steps = threading.Event(), []
    trainer = None
    lifetime_file = short_home / "state" / "lifetime.json"
    previous = 0
    try:
        for round_ in range(3):
            child = processes.add(start_volunteer(short_home, url, "--max-experts", "4", "--checkpoint-interval",
                                                  "1", name=f"round{round_}"))
            event = serving_event(child)
            if round_:
                assert sorted(event["restored"]) == sorted(event["uids"]), "a restart must restore every expert"
                assert status(short_home)["lifetime"]["backward_samples"] >= previous
            if trainer is None:
                trainer = _train_in_background(experiment, stop, steps)
            time.sleep(rng.uniform(3.0, 8.0))  # the point: a kill -9 at a random moment under load, not an event
            os.kill(child.proc.pid, signal.SIGKILL)
            child.proc.wait(timeout=10)
            saved = json.loads(lifetime_file.read_text())["backward_samples"]
            assert saved >= previous, f"lifetime went backwards: {previous} -> {saved}"
            previous = saved
            store = CheckpointStore(short_home / "data" / "checkpoints" / experiment.manifest.name)
            for uid in event["uids"]:
                assert store.load(uid, experiment.manifest.expert_type_of(uid).name) is not None
        assert previous > 0, "the volunteer served nothing under the trainer's load"
    finally:
        stop.set()
        if trainer is not None:
            trainer.join(timeout=60)


def test_a_second_signal_exits_at_once_and_leaves_whole_files(seed, short_home, processes):
    url, experiment = seed
    child = processes.add(start_volunteer(short_home, url, "--max-experts", "2", "--checkpoint-interval", "1",
                                          name="impatient"))
    uids = serving_event(child)["uids"]
    store = CheckpointStore(short_home / "data" / "checkpoints" / experiment.manifest.name)
    wait_for(lambda: all(store.load(uid, experiment.manifest.expert_type_of(uid).name) is not None for uid in uids),
             30, "a checkpoint of each expert")
    started = time.monotonic()
    child.proc.send_signal(signal.SIGTERM)
    child.wait_for_line(r'"event": "draining"', timeout=30)
    child.proc.send_signal(signal.SIGTERM)
    code = child.proc.wait(timeout=15)
    assert code == 128 + signal.SIGTERM and time.monotonic() - started < 15
    for uid in uids:
        assert store.load(uid, experiment.manifest.expert_type_of(uid).name) is not None
    leftovers = [p.name for p in (short_home / "data" / "checkpoints" / experiment.manifest.name).iterdir()
                 if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    for state in (short_home / "state").glob("*.json"):  # whatever was written is whole
        json.loads(state.read_text())


@pytest.mark.parametrize("victim", ["dht", "handler", "pool"])
def test_a_dead_hivemind_process_restarts_the_node_with_its_weights(seed, client, short_home, processes, victim):
    """A node whose DHT process, a connection handler or a TaskPool died looks alive but serves nothing
    (with one of two handlers dead, every call hung; a dead pool hangs its expert): the supervisor saves,
    restarts and serves the same uids again."""
    url, experiment = seed
    # connection handler processes exist on hivemind's serving path only (the lean one has none)
    path = ("--serving", "hivemind") if victim in ("handler", "pool") else ()  # the lean path has neither
    child = processes.add(start_volunteer(short_home, url, "--max-experts", "2", *path, name=f"lost-{victim}"))
    event = serving_event(child)
    if victim == "handler":  # the owner's pause must outlive the restart
        assert cli(short_home, "pause").returncode == 0
    pid = event["pids"]["dht"] if victim == "dht" else event["pids"][f"{victim}s"][0]
    os.kill(pid, signal.SIGKILL)
    failed = json.loads(child.wait_for_line(r'"event": "node_failed"', timeout=30).string)
    assert str(pid) in failed["reason"]
    again = serving_event(child)
    assert again["peer_id"] == event["peer_id"] and sorted(again["uids"]) == sorted(event["uids"])
    assert sorted(again["restored"]) == sorted(event["uids"]), "the weights come back from the checkpoints"
    if victim == "handler":
        paused = wait_for(lambda: status(short_home)["state"] == "paused", 10, "the restarted node to pause")
        assert paused and status(short_home)["pause_reasons"] == ["paused by the user"]
        assert cli(short_home, "resume").returncode == 0
    assert status(short_home)["state"] == "serving"
    uid = again["uids"][0]
    expert = wait_for(lambda: lookup(client, uid), 20, f"{uid} in the DHT again")
    pool = ThreadPoolExecutor(1)  # a bare RemoteExpert call has no timeout of its own
    try:
        with torch.no_grad():
            assert pool.submit(expert, torch.randn(3, experiment.manifest.d_model)).result(timeout=30).shape[0] == 3
    finally:
        pool.shutdown(wait=False)
    child.proc.send_signal(signal.SIGTERM)
    assert child.proc.wait(timeout=60) == 0


def test_the_failure_budget_backs_off_then_gives_up():
    from volunteer.node.supervisor import FailureBudget, NodeFailed

    now = [0.0]
    budget = FailureBudget(delays=(1.0, 5.0, 30.0), window=600.0, clock=lambda: now[0])
    assert [budget.next_delay("boom") for _ in range(3)] == [1.0, 5.0, 30.0]
    with pytest.raises(NodeFailed, match="boom; 4 failures within 10 min, giving up"):
        budget.next_delay("boom")
    now[0] = 10_000.0  # long after, the old failures no longer count
    assert budget.next_delay("again") == 1.0
    # the client exits 1 with the reason in one line: not bad input, so a service manager may retry
    from volunteer.cli import _exit_for

    code = _exit_for(NodeFailed("boom; 4 failures within 10 min, giving up"))
    assert code.exit_code == 1


def test_between_a_failure_and_the_restart_status_says_restarting_and_stop_stops(seed, short_home, processes):
    from volunteer.node import control

    url, _experiment = seed
    child = processes.add(start_volunteer(short_home, url, "--max-experts", "1", name="gap"))
    os.kill(serving_event(child)["pids"]["dht"], signal.SIGKILL)
    child.wait_for_line(r'"event": "stopped"', timeout=60)  # the failed node has left; 2 s until the restart
    path = control.socket_path(short_home / "runtime")
    # the socket answers in the gap (a few seconds: the back-off, then the new node's start)
    answer = wait_for(lambda: _restarting(control, path), 5, "'restarting' on the socket", period=0.1)
    assert answer["status"]["peer_id"] and answer["status"]["experts"], "the last figures come along"
    assert control.request(path, "stop")["pid"] == child.proc.pid
    assert child.proc.wait(timeout=60) == 0
    assert not any('"event": "serving"' in line for line in child.output[-5:]), "it started again"
    assert not path.exists()


def _restarting(control, path):
    """The status answer if it says "restarting"; None while the old node's socket is going or none is up."""
    try:
        answer = control.request(path, "status", timeout=2.0)
    except control.ControlError:
        return None
    return answer if answer["status"]["state"] == "restarting" else None


def test_nodes_start_on_one_long_lived_thread_while_trio_workers_come_and_go():
    """hivemind's DHT and p2pd die with the thread that forked them (PR_SET_PDEATHSIG): every start runs
    on the same ``NodeThread``, never on one of trio's worker threads, which retire when idle; an error
    comes back to the caller, and a cancelled caller still waits for the start to end."""
    import trio

    from volunteer.node.supervisor import NodeThread

    node_thread = NodeThread()

    async def main():
        first = await node_thread.run(threading.current_thread)
        workers = {await trio.to_thread.run_sync(threading.current_thread) for _ in range(3)}
        again = await node_thread.run(threading.current_thread)
        with pytest.raises(ZeroDivisionError):
            await node_thread.run(lambda: 1 / 0)
        done = []
        with trio.move_on_after(0.01):
            await node_thread.run(lambda: (time.sleep(0.2), done.append(1)))
        return first, workers, again, done

    try:
        first, workers, again, done = trio.run(main)
    finally:
        node_thread.close()
    assert first is again and first.name == "volunteer-node" and first not in workers
    assert done == [1], "a start is never abandoned half done"
