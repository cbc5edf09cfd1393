"""A volunteer node's life: get the experiment, size, join, serve, checkpoint, leave.

``VolunteerNode`` holds the blocking hivemind side (its DHT and ``Server`` live in their own threads
and processes); ``run_volunteer`` is the trio supervisor that starts it, keeps it announced and
checkpointed, and shuts it down on a signal or a stop request.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import trio
from hivemind import DHT
from hivemind.moe import Server

from volunteer import swarm
from volunteer.checkpoints import CheckpointStore
from volunteer.coordinator import Experiment, fetch_experiment
from volunteer.hardware import HardwareProfile, detect_hardware
from volunteer.manifest import load as load_manifest
from volunteer.paths import Paths, write_atomic
from volunteer.procgroup import InstanceLock, become_supervisor
from volunteer.serving import CountingBackend, build_backends
from volunteer.settings import Settings
from volunteer.sizing import Plan, plan_experts

logger = logging.getLogger(__name__)
SERVER_START_TIMEOUT = 120.0


@dataclass(frozen=True)
class NodeInfo:
    """What a started node serves, as printed on its one "serving" line and kept in node.json."""

    experiment: str
    peer_id: str
    maddrs: tuple[str, ...]
    uids: tuple[str, ...]
    device: str
    restored: tuple[str, ...]
    plan: Plan

    def serving_line(self) -> str:
        restored = f", {len(self.restored)} restored from checkpoints" if self.restored else ""
        return (
            f"serving {len(self.uids)} experts of {self.experiment} on {self.device} as {self.peer_id}{restored}: "
            + " ".join(self.uids)
        )


def load_experiment(settings: Settings, paths: Paths) -> Experiment:
    if settings.coordinator:
        return fetch_experiment(settings.coordinator, paths.cache_dir)
    return Experiment(load_manifest(settings.experiment_file), tuple(settings.initial_peers), "file")


class VolunteerNode:
    def __init__(self, settings: Settings, paths: Paths, experiment: Experiment):
        self.settings, self.paths, self.experiment = settings, paths, experiment
        self.manifest = experiment.manifest
        self.store = CheckpointStore(paths.data_dir / "checkpoints" / self.manifest.name)
        self.state_file = paths.state_dir / "node.json"
        self.dht: DHT | None = None
        self.server: Server | None = None
        self.backends: dict[str, CountingBackend] = {}
        self.info: NodeInfo | None = None

    def start(self, hardware: HardwareProfile | None = None) -> NodeInfo:
        hardware = hardware or detect_hardware()
        self.dht = swarm.join_dht(
            self.manifest.dht_prefix, self.experiment.initial_peers,
            host=self.settings.host, port=self.settings.port, announce_host=self.settings.announce_host,
            identity_path=self.paths.data_dir / "identity.key",
        )
        peer_id = self.dht.peer_id.to_base58()
        plan = self._plan(hardware, peer_id)
        self.backends, restored = build_backends(self.manifest, plan.uids, plan.max_batch_size, self.store)
        self.server = Server(
            self.dht, self.backends, num_connection_handlers=self.settings.num_handlers,
            update_period=self.settings.announce_interval, device=torch.device(plan.device),
        )
        self.server.run_in_background(await_ready=True, timeout=SERVER_START_TIMEOUT)
        self.info = NodeInfo(
            self.manifest.name, peer_id, tuple(swarm.visible_maddrs(self.dht)), plan.uids, plan.device,
            tuple(restored), plan,
        )
        self.announce()
        self._save_state()
        return self.info

    def _plan(self, hardware: HardwareProfile, peer_id: str) -> Plan:
        uids = self.manifest.all_uids()
        counts = dict(swarm.count_servers(self.dht, self.manifest.dht_prefix, uids))
        # experts this volunteer trained before come first: their weights are worth more than fresh ones
        for uid in self._previous_uids():
            counts[uid] = -1
        return plan_experts(
            hardware, self.manifest, counts, device=self.settings.device, max_memory=self.settings.max_memory,
            max_experts=self.settings.max_experts, seed=zlib.crc32(peer_id.encode()),
        )

    def _previous_uids(self) -> list[str]:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            logger.warning(f"state file {self.state_file} is unreadable ({e}); choosing experts afresh")
            return []
        if not isinstance(state, dict) or state.get("experiment") != self.manifest.name:
            return []
        valid = set(self.manifest.all_uids())
        return [uid for uid in state.get("uids", []) if isinstance(uid, str) and uid in valid]

    def _save_state(self) -> None:
        self.paths.state_dir.mkdir(parents=True, exist_ok=True)
        state = dict(experiment=self.manifest.name, uids=list(self.info.uids), device=self.info.device,
                     peer_id=self.info.peer_id, plan=self.info.plan.to_dict(), saved=time.time())
        write_atomic(self.state_file, lambda f: f.write(json.dumps(state, indent=1).encode()))

    def announce(self) -> None:
        record = swarm.VolunteerRecord(self.info.peer_id, self.info.uids, self.info.device, 0.0)
        swarm.publish_volunteer(self.dht, self.manifest.dht_prefix, record)

    def checkpoint(self) -> int:
        for backend in list(self.backends.values()):
            self.store.save(backend.to_checkpoint())
        return len(self.backends)

    def shutdown(self) -> None:
        """Leave the swarm in order: withdraw, save, stop serving, stop the DHT."""
        if self.server is None:
            if self.dht is not None:
                self.dht.shutdown()
            return
        try:
            swarm.withdraw_volunteer(self.dht, self.manifest.dht_prefix)
        except Exception as e:  # the DHT may already be gone; leaving must go on
            logger.warning(f"could not withdraw the volunteer record: {e}")
        try:
            self.checkpoint()
        finally:
            self.server.shutdown()  # also shuts the DHT down
            self.server.join(timeout=30)
            self.server = None


def run_volunteer(
    settings: Settings, paths: Paths, *, on_ready: Callable[[NodeInfo], None] = lambda info: None
) -> NodeInfo:
    """Run a volunteer until SIGINT/SIGTERM. Raises on bad input before anything is served."""
    become_supervisor()
    # NVML numbers GPUs by PCI bus, CUDA by speed unless told otherwise: make "cuda:N" mean the same GPU
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    lock = InstanceLock(paths.state_dir / "volunteer.lock")
    warning = lock.acquire()
    if warning:
        logger.warning(warning)
    node = None
    try:
        node = VolunteerNode(settings, paths, load_experiment(settings, paths))
        # Started on the main thread, not a trio worker: a child's PDEATHSIG fires when the *thread*
        # that forked it exits, and trio retires idle worker threads after a few seconds.
        info = node.start()
        on_ready(info)
        trio.run(supervise, node)
        return info
    finally:
        if node is not None:
            node.shutdown()
        lock.release()


async def supervise(node: VolunteerNode) -> None:
    """Keep the node checkpointed and announced until SIGINT or SIGTERM."""
    settings = node.settings
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_every, settings.checkpoint_interval, node.checkpoint)
            nursery.start_soon(_every, settings.announce_interval, node.announce)
            async for signum in signals:
                logger.info(f"received {signal.Signals(signum).name}; leaving the swarm")
                nursery.cancel_scope.cancel()
                break


async def _every(period: float, action: Callable[[], object]) -> None:
    while True:
        await trio.sleep(period)
        try:
            await trio.to_thread.run_sync(action)
        except Exception as e:  # one failed save or announce must not stop serving
            logger.warning(f"{getattr(action, '__name__', action)} failed: {type(e).__name__}: {e}")
