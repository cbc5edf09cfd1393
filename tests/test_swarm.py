"""End to end on loopback: a coordinator seed, two `volunteer start` processes, the trainer, a plain hivemind client.

The tests share one swarm (starting it costs ~30 s on 2 cores) and run in file order: spread, plain
client, training, then kill -9 and restart.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.moe import get_experts

from coordinator_seeds.dispatch import shutdown_dht
from coordinator_seeds.trainer import TrainerSettings, train
from tests.conftest import TEST_MANIFEST, Processes, wait_for
from volunteer.core.harness import start_seed, start_volunteer
from volunteer.core.records import join_dht, read_volunteers
from volunteer.core.seed_client import fetch_experiment
from volunteer.serving.backends import initial_seed
from volunteer.serving.checkpoints import CheckpointStore
from volunteer.serving.experts import build_expert

pytestmark = pytest.mark.integration
SERVING = r"\"message\": \"serving (\d+) experts of test-lm on cpu as (\S+?)(?:, (\d+) restored from checkpoints)?: ([^\"]+)\""


class Swarm:
    def __init__(self, root: Path):
        self.root = root
        self.procs = Processes()
        try:
            self._start()
        except BaseException:
            self.procs.stop_all()  # a fixture that fails in set-up gets no teardown
            raise

    def _start(self) -> None:
        root = self.root
        manifest_file = root / "test-lm.toml"
        manifest_file.write_text(TEST_MANIFEST)
        seed, self.url = start_seed(experiment=manifest_file, home=root / "seed")
        self.procs.add(seed)
        self.experiment = fetch_experiment(self.url, root / "client-cache")
        self.manifest = self.experiment.manifest
        self.volunteers: dict[str, object] = {}
        self.uids: dict[str, set[str]] = {}
        for name in ("a", "b"):  # one after the other, as volunteers join a real swarm
            self.start_volunteer(name)

    def home(self, name: str) -> Path:
        return self.root / f"volunteer-{name}"

    def start_volunteer(self, name: str):
        child = self.procs.add(start_volunteer(
            self.home(name), self.url, "--max-experts", "4", "--checkpoint-interval", "2", name=name,
        ))
        match = child.wait_for_line(SERVING, timeout=150)
        self.volunteers[name] = child
        self.uids[name] = set(match.group(4).split())
        return match

    def checkpoints(self, name: str) -> CheckpointStore:
        return CheckpointStore(self.home(name) / "data" / "checkpoints" / self.manifest.name)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    swarm = Swarm(tmp_path_factory.mktemp("swarm"))
    yield swarm
    swarm.procs.stop_all()


def test_volunteers_split_the_grid_without_duplicates(swarm):
    a, b = swarm.uids["a"], swarm.uids["b"]
    assert len(a) == len(b) == 4
    assert not a & b
    assert a | b == set(swarm.manifest.all_uids())


def test_plain_hivemind_client_calls_served_experts(swarm):
    """A program that knows only the DHT address can run forward and backward on a served expert."""
    dht = hivemind.DHT(initial_peers=list(swarm.experiment.initial_peers), client_mode=True, start=True)
    try:
        uid = sorted(swarm.uids["a"])[0]
        [expert] = get_experts(dht, [uid])
        assert expert is not None, f"{uid} not found in the DHT"
        x = torch.randn(5, swarm.manifest.d_model, requires_grad=True)
        local = build_expert("residual_ffn", swarm.manifest.d_model, 64, seed=initial_seed(uid))
        y = expert(x)
        assert torch.allclose(y, local(x), atol=1e-5)
        y.pow(2).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    finally:
        shutdown_dht(dht)  # closes the expert-call client first, or it raises at GC on the main thread


def _train(swarm: Swarm, steps: int, stop: threading.Event | None = None):
    # one micro-batch a step, as the loss bound was set for (micro-batches in flight: tests/test_trainer.py)
    settings = TrainerSettings(swarm.manifest, swarm.experiment.initial_peers, steps=steps, log_every=5,
                               forward_timeout=5.0, backward_timeout=5.0, in_flight=1)
    return train(settings, stop=stop)


def test_trainer_loss_falls_and_both_volunteers_train(swarm):
    reports = _train(swarm, steps=60)
    losses = [r.loss for r in reports if not r.skipped]
    assert len(losses) >= 50
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    # byte-level LM: ln(256) = 5.5 at random; learning the byte statistics alone takes it well below 4.5
    assert last < first - 1.0, f"loss went from {first:.2f} to only {last:.2f}"

    def trained(name: str) -> int:
        """How many of a volunteer's experts have a checkpoint that holds trained weights."""
        store, count = swarm.checkpoints(name), 0
        for uid in swarm.uids[name]:
            checkpoint = store.load(uid, "small")
            if checkpoint is not None:
                fresh = build_expert("residual_ffn", swarm.manifest.d_model, 64, seed=initial_seed(uid)).state_dict()
                changed = any(not torch.equal(fresh[k], checkpoint.module[k]) for k in fresh)
                count += changed and checkpoint.updates > 0
        return count

    for name in ("a", "b"):
        # checkpoints are written every 2 s: the first one after the training holds the trained weights
        wait_for(lambda: trained(name) >= 1, 30, f"a checkpoint of volunteer {name} trained by backward requests")
        store = swarm.checkpoints(name)
        missing = [uid for uid in swarm.uids[name] if store.load(uid, "small") is None]
        assert not missing, f"volunteer {name} has no checkpoint of {missing}"


def _checkpointed_updates(swarm: Swarm, name: str) -> int:
    """Optimizer updates of a volunteer's experts, as its latest checkpoints hold them."""
    store = swarm.checkpoints(name)
    return sum(c.updates for uid in swarm.uids[name] if (c := store.load(uid, "small")) is not None)


def test_kill_9_volunteer_then_restart_restores_it(swarm):
    stop = threading.Event()
    reports: list = []
    trainer = threading.Thread(target=lambda: reports.extend(_train(swarm, steps=400, stop=stop)), daemon=True)
    updates_before = _checkpointed_updates(swarm, "a")
    trainer.start()
    try:
        # mid-training: this trainer's backward passes have reached volunteer a's checkpoints (its reports
        # arrive only at the end, so the checkpoints, written every 2 s, are what can be watched)
        wait_for(lambda: not trainer.is_alive() or _checkpointed_updates(swarm, "a") > updates_before, 60,
                 "volunteer a to checkpoint updates from the running trainer")
        assert trainer.is_alive(), "the trainer ended before the kill"
        victim = swarm.volunteers["a"].proc
        os.kill(victim.pid, signal.SIGKILL)  # only the main pid: its children must not linger
        victim.wait(timeout=10)
        # letting time pass is the point here, not a wait for an event: the trainer must go on training
        # (not skipping) on volunteer b's experts for a while after the kill; its reports come at the end
        time.sleep(8)
    finally:
        stop.set()
        trainer.join(timeout=60)
    assert not trainer.is_alive()
    after_kill = [r for r in reports if r.step > 0][-10:]
    assert after_kill and all(not r.skipped for r in after_kill[-3:]), "trainer stopped training after the kill"

    saved = {uid: swarm.checkpoints("a").load(uid, "small") for uid in swarm.uids["a"]}
    assert all(saved.values())
    old_uids = swarm.uids["a"]
    match = swarm.start_volunteer("a")
    assert swarm.uids["a"] == old_uids
    assert int(match.group(3) or 0) == 4, "restart did not restore its checkpoints"

    # the killed run's record lives on for a minute; signed with the same stored key, the new one replaces it
    # (read by a peer with the experiment's validators: a plain hivemind DHT's get of these keys hung)
    records = join_dht(swarm.manifest.dht_prefix, swarm.experiment.initial_peers, client_mode=True)
    try:
        mine = [r for r in read_volunteers(records, swarm.manifest.dht_prefix) if r.peer_id == match.group(2)]
        assert len(mine) == 1, f"the restarted volunteer is counted {len(mine)} times"
    finally:
        shutdown_dht(records)
    dht = hivemind.DHT(initial_peers=list(swarm.experiment.initial_peers), client_mode=True, start=True)
    try:
        x = torch.randn(3, swarm.manifest.d_model)
        for uid, checkpoint in saved.items():
            [expert] = get_experts(dht, [uid])
            local = build_expert("residual_ffn", swarm.manifest.d_model, 64)
            local.load_state_dict(checkpoint.module)
            assert torch.allclose(expert(x), local(x), atol=1e-5), f"{uid} does not serve its checkpoint"
    finally:
        shutdown_dht(dht)  # closes the expert-call client first, or it raises at GC on the main thread
