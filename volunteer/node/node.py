"""A volunteer node's life: get the experiment, size, join, serve, checkpoint, leave.

``VolunteerNode`` holds the blocking hivemind side (its DHT and ``Server`` live in their own threads
and processes) and the ``StatsCollector`` fed by its backends; ``supervisor.run_volunteer`` starts
it, keeps it announced, checkpointed and visible, and drains it on a signal or a stop request.
The node alone changes its ``NodeState`` (``_enter``): start, pause, resume and the drain.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from hivemind import DHT
from hivemind.moe import Server
from hivemind.p2p import P2PDaemonError
from hivemind.utils import get_dht_time

from volunteer.config.settings import Settings
from volunteer.core import expert_records, records
from volunteer.core.dht_calls import declare_grid_roots
from volunteer.core.logs import EventLog
from volunteer.core.manifest import load as load_manifest
from volunteer.core.paths import Paths, write_atomic
from volunteer.core.seed_client import (
    CoordinatorError,
    Experiment,
    experiment_from_file,
    fetch_experiment,
    fetch_trusted_trainer_keys,
)
from volunteer.host.hardware import HardwareProfile, detect_hardware
from volunteer.node import swarm
from volunteer.node.limits import limits_of
from volunteer.node.reachability import Reach
from volunteer.node.stats import (
    LifetimeStore,
    NodeState,
    PlanView,
    StatsCollector,
    StatsSnapshot,
)
from volunteer.planning.devices import (
    Device,
    ServingDevices,
    pick_devices,
    serving_devices,
)
from volunteer.planning.memory import PlanCheck
from volunteer.planning.placement import Measuring, Placement, SwarmView, plan_volunteer
from volunteer.planning.rebalance import Rebalance, rebalance_moves
from volunteer.planning.throughput import measured_peak
from volunteer.serving.backends import (
    CountingBackend,
    VolunteerServer,
    build_backends,
    resume_declaring,
    stop_declaring,
    task_pools,
)
from volunteer.serving.batching import served_rate
from volunteer.serving.checkpoints import CheckpointStore
from volunteer.serving.handler import LeanServer
from volunteer.serving.versions import AuditedBackend, RevealService

logger = logging.getLogger(__name__)
SERVER_START_TIMEOUT = 120.0
DRAIN_QUIET = 2.0  # seconds without a request after which in-flight work is taken to be done
DRAIN_TIMEOUT = 20.0  # trainers look experts up every 15 s: after that, nobody should still call us


@dataclass(frozen=True)
class NodeInfo:
    """What a started node serves, as printed on its one "serving" line and kept in node.json."""

    experiment: str
    peer_id: str
    maddrs: tuple[str, ...]
    placement: Placement  # one plan per serving device
    restored: tuple[str, ...]

    @property
    def uids(self) -> tuple[str, ...]:
        return self.placement.uids

    @property
    def device(self) -> str:
        return self.placement.device

    def serving_line(self) -> str:
        restored = f", {len(self.restored)} restored from checkpoints" if self.restored else ""
        return (
            f"serving {len(self.uids)} experts of {self.experiment} on {self.device} as {self.peer_id}{restored}: "
            + " ".join(self.uids)
        )


def load_experiment(settings: Settings, paths: Paths) -> Experiment:
    if settings.coordinator:
        return fetch_experiment(settings.coordinator, paths.cache_dir)
    if settings.initial_peers:  # checked here, before the p2p daemon fails on them with a Go log line
        return experiment_from_file(settings.experiment_file, settings.initial_peers)
    return Experiment(load_manifest(settings.experiment_file), (), "file")


class VolunteerNode:
    def __init__(self, settings: Settings, paths: Paths, experiment: Experiment, events: EventLog | None = None,
                 prefer: tuple[str, ...] = ()):
        self.settings, self.paths, self.experiment = settings, paths, experiment
        self.prefer = prefer  # uids to serve first (a rebalance's choice), else those of the last run
        self.events = events or EventLog()
        self.manifest = experiment.manifest
        self.store = CheckpointStore(paths.data_dir / "checkpoints" / self.manifest.name)
        self.store.sweep()  # we hold the state dir's lock: any temporary file here is a dead writer's
        self.last_run = LastRun(paths.state_dir / "node.json", self.manifest.name)
        self.state_file = self.last_run.path
        self._state, self._pause_reasons = NodeState.JOINING, ()
        self.dht: DHT | None = None
        self.server: LeanServer | Server | None = None
        self.backends: dict[str, CountingBackend] = {}
        self.info: NodeInfo | None = None
        self.collector: StatsCollector | None = None
        self.torch_devices: dict[Device, str] = {}  # plan device (NVML numbering) -> torch device
        self.reveals: RevealService | None = None
        self._trusted: tuple[str, ...] | None = None
        self.reach = Reach.CHECKING  # how trainers reach us, as ``ReachWatch`` last read it

    def start(self, hardware: HardwareProfile | None = None, torch_devices: dict[Device, str] | None = None
              ) -> NodeInfo:
        """Join, plan, serve. ``hardware`` and ``torch_devices`` (plan device -> torch device) are test
        seams: they let a CPU-only machine run the several-GPU path on CPU."""
        hardware = hardware or detect_hardware()
        # a bad choice fails here, before joining: an absent GPU, or one torch cannot see
        if torch_devices is None:  # NVML numbers GPUs its own way: each gets torch's name for it now
            devices = serving_devices(hardware, self.settings.device, self.settings.gpus).for_torch(hardware)
        else:
            devices = ServingDevices(pick_devices(hardware, self.settings.device, self.settings.gpus),
                                     torch=dict(torch_devices))
        self.torch_devices = dict(devices.torch)
        previous = self.last_run.load()
        self.dht = self._join(previous.get("port"))
        peer_id = self.dht.peer_id.to_base58()
        maddrs = tuple(records.visible_maddrs(self.dht))
        self.events.emit("joined", f"joined the DHT of {self.manifest.name} as {peer_id}", peer_id=peer_id,
                         maddrs=list(maddrs))
        if not self.experiment.initial_peers:  # easy to do by mistake: --experiment without --initial-peers
            self.events.emit("alone", "no initial peers: this volunteer is a swarm of its own, and no trainer "
                             f"can reach it unless started with --initial-peers {maddrs[0] if maddrs else '<address>'}",
                             maddrs=list(maddrs))
        placement = self._place(hardware, devices, peer_id)
        if self.settings.cpu_threads:
            torch.set_num_threads(self.settings.cpu_threads)
        power = self.settings.power_level  # light and medium take smaller batches and idle between them
        restored = []
        for plan in placement.plans:
            backends, restored_here = build_backends(
                self.manifest, plan.uids, max(1, int(plan.max_batch_size * power.batch_fraction)), self.store,
                duty_cycle=power.duty_cycle, device=self.torch_devices[plan.device],
                pools=self.settings.serving == "hivemind", backend_class=AuditedBackend,
            )
            self.backends.update(backends)
            restored += restored_here
        for uid in restored:
            steps = self.backends[uid].counters.snapshot().optimizer_steps
            self.events.emit("expert_restored", f"restored {uid} from its checkpoint ({steps} updates)",
                             uid=uid, optimizer_steps=steps)
        self.server = self._expert_server(placement)
        self.server.run_in_background(await_ready=True, timeout=SERVER_START_TIMEOUT)
        # audits: trainers call the audited handlers and ask for committed versions; on the lean path
        # those calls are computed by the same device workers as hivemind's
        workers = self.server.handler.workers if isinstance(self.server, LeanServer) else None
        self.reveals = RevealService(self.dht, self.backends, workers)
        self.reveals.run_in_background()
        self.info = NodeInfo(self.manifest.name, peer_id, maddrs, placement, tuple(restored))
        self.collector = StatsCollector(
            self.manifest.name, peer_id, placement.device, [b.counters for b in self.backends.values()],
            LifetimeStore(self.paths.state_dir / "lifetime.json"), plans=[PlanView(plan) for plan in placement.plans],
            limits=limits_of(self.settings),
        )
        self.announce()
        self.last_run.save(self.info)
        self._enter(NodeState.SERVING)
        return self.info

    @property
    def state(self) -> NodeState:
        return self._state

    @property
    def pause_reasons(self) -> tuple[str, ...]:
        return self._pause_reasons

    def _enter(self, state: NodeState, pause_reasons: tuple[str, ...] = ()) -> None:
        """The one place the node's state changes."""
        self._state, self._pause_reasons = state, pause_reasons

    def snapshot(self) -> StatsSnapshot:
        """What the views show of this node: the collector's figures in the node's state."""
        return self.collector.snapshot(self._state, self._pause_reasons)

    def _expert_server(self, placement: Placement) -> LeanServer | VolunteerServer:
        """The lean in-process path (``serving.handler``) by default; hivemind's own ``Server`` with
        ``serving = "hivemind"``. Both answer the same RPCs; only where the work is done differs."""
        placed = [(self.torch_devices[plan.device], plan.uids) for plan in placement.plans]
        if self.settings.serving == "hivemind":
            return VolunteerServer(self.dht, self.backends, num_connection_handlers=self.settings.num_handlers,
                                   update_period=self.settings.announce_interval, placed=placed)
        return LeanServer(self.dht, self.backends, placed, update_period=self.settings.announce_interval)

    def check_plans(self) -> list[PlanCheck]:
        """Each device's memory plan next to the peak measured there since start (dashboard, status)."""
        return [PlanCheck.of(plan, measured_peak(self.torch_devices[plan.device])) for plan in self.info.placement.plans]

    def report_serving(self) -> None:
        info = self.info
        self.events.emit("serving", info.serving_line(), peer_id=info.peer_id, device=info.device,
                         uids=list(info.uids), restored=list(info.restored), maddrs=list(info.maddrs),
                         pids=dict(dht=self.dht.pid, handlers=[h.pid for h in self.server.conn_handlers],
                                   pools=[pool.pid for pool in task_pools(self.backends.values())]),
                         **info.placement.to_dict())
        for note in info.placement.left_out:
            self.events.emit("device_left_out", note)

    def _place(self, hardware: HardwareProfile, devices: ServingDevices, peer_id: str) -> Placement:
        uids = self.manifest.all_uids()
        counts, served = self._signed_swarm(uids)
        counts = dict(counts)
        # experts this volunteer trained before (or a rebalance chose) come first: their weights are
        # worth more than fresh ones
        for uid in self.prefer or self._previous_uids():
            counts[uid] = -1
        seen = SwarmView(counts, served, seed=zlib.crc32(peer_id.encode()))
        # measured on each device once and cached; it is what this volunteer announces it can serve
        return plan_volunteer(hardware, self.manifest, devices, swarm=seen, max_memory=self.settings.max_memory,
                              max_experts=self.settings.max_experts,
                              measuring=Measuring(self.paths.cache_dir, self.settings.remeasure),
                              task_pools=self.settings.serving == "hivemind")

    @property
    def samples_per_second(self) -> float:
        """What this volunteer can serve, as announced and balanced on: the rate measured through the
        serving path once it has served enough (``served_rate``), else the local torch measurement."""
        served = served_rate(self.server.served())  # both paths time their requests (serving.served)
        return served if served is not None else self._measured_samples_per_second()

    def _measured_samples_per_second(self) -> float:
        """On each device, the mean measured local torch rate of its experts' types; the devices
        compute at once, so their rates add up."""
        total = 0.0
        for plan in self.info.placement.plans:
            rates = {t.expert_type: t.samples_per_second for t in plan.throughput}
            mine = [rates.get(t, 0.0) for t in plan.expert_types]
            total += sum(mine) / len(mine) if mine else 0.0
        return total

    def rebalance(self) -> Rebalance:
        """Whether moving some experts would serve the swarm's weakest uids better (``rebalance.rebalance_moves``)."""
        uids = self.manifest.all_uids()
        counts, served = self._signed_swarm(uids)
        share = self.samples_per_second / max(1, len(self.info.uids))
        # per layer, not per uid: Manifest.expert_type_of lists the uid's layer each call (O(G) a uid)
        types = {uid: layer.expert_type for layer in self.manifest.layers for uid in layer.uids()}
        return rebalance_moves(
            self.info.uids, served, dict.fromkeys(self.info.uids, share),
            server_counts=counts, expert_types=types,
        )

    def _signed_swarm(self, uids: list[str]):
        """Servers and served rate per uid from signed records, minus the keys the seed banned."""
        banned = expert_records.read_banned(self.dht, self.manifest.dht_prefix, self._trusted_keys())
        return swarm.signed_swarm(self.dht, self.manifest.dht_prefix, uids, banned)

    def _trusted_keys(self) -> tuple[str, ...]:
        """The seed's keys, whose ban lists we follow (none without a coordinator); asked once."""
        if self._trusted is None:
            self._trusted = ()
            if self.settings.coordinator:
                try:
                    self._trusted = fetch_trusted_trainer_keys(self.settings.coordinator)
                except CoordinatorError as e:
                    logger.info(f"no ban list to follow: {e}")
        return self._trusted

    def _join(self, previous_port: object) -> DHT:
        """Join on the port given, else on the port of the last run: peers that cached our address
        (trainers, other volunteers) reach us again at once. Any free port if that one is taken."""
        records.use_record_key(self.paths.data_dir / "record-key.der")  # the same owner of our records in every run
        join = partial(records.join_dht, self.manifest.dht_prefix, self.experiment.initial_peers,
                       host=self.settings.host, announce_host=self.settings.announce_host,
                       startup_timeout=self.settings.startup_timeout,
                       identity_path=self.paths.data_dir / "identity.key")
        if self.settings.port or not isinstance(previous_port, int) or not 0 < previous_port < 65536:
            return join(port=self.settings.port)
        try:
            return join(port=previous_port)
        except P2PDaemonError as e:
            if "address already in use" not in str(e):
                raise
            logger.info(f"port {previous_port} of the last run is taken; listening on a new one")
            return join(port=0)

    def _previous_uids(self) -> list[str]:
        valid = set(self.manifest.all_uids())
        uids = self.last_run.load().get("uids", [])
        return [uid for uid in uids if isinstance(uid, str) and uid in valid] if isinstance(uids, list) else []

    def announce(self) -> None:
        if self._state is NodeState.PAUSED or not self.dht.is_alive():
            return
        record = records.VolunteerRecord(self.info.peer_id, self.info.uids, self.info.device, self.samples_per_second)
        records.publish_volunteer(self.dht, self.manifest.dht_prefix, record)
        # the rows we serve, in the grid's root record: readers find the active rows in one key
        declare_grid_roots(self.dht, self.info.uids, get_dht_time() + records.RECORD_TTL)
        self._announce_servers()

    def _announce_servers(self) -> None:
        """Our signed record of the uids we serve: what the project's trainers route by (issue 14)."""
        share = self.samples_per_second / max(1, len(self.info.uids))
        expert_records.publish_servers(self.dht, self.manifest.dht_prefix, self.info.uids, peer_id=self.info.peer_id,
                                       device=self.info.device, samples_per_second=share,
                                       reachable=self.reach.announced_direct, ttl=expert_records.ANNOUNCE_TTL)

    def checkpoint(self) -> int:
        for backend in list(self.backends.values()):
            self.store.save(backend.to_checkpoint())
        return len(self.backends)

    def withdraw(self) -> None:
        """Stop announcing and hide our records: trainers route elsewhere at their next lookup."""
        if self.server is None:
            return
        stop_declaring(self.server)
        if not self.dht.is_alive():  # its calls would wait for ever; its records expire on their own
            return
        try:
            records.withdraw_experts(self.dht, self.info.uids, self.server.dht_handler_thread.expiration)
            records.withdraw_volunteer(self.dht, self.manifest.dht_prefix)
            expert_records.withdraw_servers(self.dht, self.manifest.dht_prefix, self.info.uids)
        except Exception as e:  # the DHT may already be gone; leaving must go on
            logger.warning(f"could not withdraw our DHT records: {e}")

    def pause(self, reasons: tuple[str, ...]) -> None:
        """Free the machine now: requests are refused (trainers fail over at once), records hidden.
        Paused already, only the reasons change."""
        if self._state is NodeState.PAUSED:
            self._enter(NodeState.PAUSED, reasons)
            return
        for backend in self.backends.values():
            backend.paused.set()
        self._enter(NodeState.PAUSED, reasons)
        self.withdraw()

    def resume(self) -> None:
        """Serve again with the weights still in memory: unpause, re-declare, re-announce."""
        for backend in self.backends.values():
            backend.paused.clear()
        resume_declaring(self.server)
        self._enter(NodeState.SERVING)
        self.announce()

    def begin_drain(self) -> None:
        """From here the node only finishes its work and leaves (``drain``, ``shutdown``)."""
        self._enter(NodeState.DRAINING, self._pause_reasons)

    def drain(self, quiet: float = DRAIN_QUIET, timeout: float = DRAIN_TIMEOUT) -> float:
        """Withdraw, then keep serving until no request came for ``quiet`` seconds (trainers have moved
        on and in-flight requests are done) or ``timeout`` passed. Returns the seconds it took."""
        started = time.monotonic()
        self.withdraw()
        while time.monotonic() - started < timeout:
            last = max((b.counters.snapshot().last_request or 0.0 for b in self.backends.values()), default=0.0)
            if time.time() - last >= quiet and time.monotonic() - started >= min(quiet, timeout):
                break
            time.sleep(0.1)
        return time.monotonic() - started

    def failure(self) -> str | None:
        """What stopped working in hivemind's machinery, or None while the node can serve."""
        server, dht = self.server, self.dht
        if server is None or dht is None:
            return None
        failure = server.failure()  # a dead worker thread, RPC loop, runtime or handler process
        if failure:
            return failure
        if not dht.is_alive():
            return f"the DHT process (pid {dht.pid}) died"
        return None

    def shutdown(self) -> None:
        """Leave the swarm in order: withdraw, save, stop serving, stop the DHT. Safe to call twice."""
        try:
            self.withdraw()
        except Exception as e:  # whatever went wrong, hivemind's processes must still be stopped
            logger.warning(f"could not withdraw: {type(e).__name__}: {e}")
        server, dht = self.server, self.dht
        self.server = self.dht = None
        if server is None:
            if dht is not None:
                dht.shutdown()
            return
        try:
            self.checkpoint()
            if self.collector is not None:
                self.collector.persist(final=True)
        finally:
            if self.reveals is not None:
                self.reveals.shutdown()
            server.shutdown()  # also shuts the DHT down
            server.join(timeout=30)


class LastRun:
    """node.json: what the last run of an experiment served, and on which port. Read at start to
    serve the same uids again (their weights are worth more than fresh ones) on the same port."""

    def __init__(self, path: Path, experiment: str):
        self.path, self.experiment = path, experiment

    def load(self) -> dict:
        """What node.json says of the last run of this experiment; {} if none or unreadable."""
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as e:
            logger.warning(f"state file {self.path} is unreadable ({e}); starting afresh")
            return {}
        if not isinstance(state, dict) or state.get("experiment") != self.experiment:
            return {}
        return state

    def save(self, info: NodeInfo) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = dict(experiment=info.experiment, uids=list(info.uids), device=info.device,
                     peer_id=info.peer_id, port=_tcp_port(info.maddrs), **info.placement.to_dict(),
                     saved=time.time())
        write_atomic(self.path, lambda f: f.write(json.dumps(state, indent=1).encode()))


def _tcp_port(maddrs: tuple[str, ...]) -> int | None:
    for maddr in maddrs:
        parts = maddr.split("/")
        if "tcp" in parts and parts.index("tcp") + 1 < len(parts) and parts[parts.index("tcp") + 1].isdigit():
            return int(parts[parts.index("tcp") + 1])
    return None
