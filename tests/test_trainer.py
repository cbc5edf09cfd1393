"""The batched MoE dispatch and the trainer, against real hivemind servers on 127.0.0.1 (no mocks).

One bootstrap DHT peer per module. A "frozen" server (SGD with lr 0, so weights never move) checks the
dispatch against a local reference; two training servers (Adam) split the experts of a two-layer model
so one can die while the trainer runs. Each server runs in a child process of its own (see
``ServerProcess``); the trainer and the dispatch run here, as clients.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import signal
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Callable, Iterator

import pytest
import torch
from hivemind import DHT
from hivemind.moe import ModuleBackend, Server, declare_experts
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from coordinator_seeds.dispatch import (
    UNROUTABLE_EVICTION,
    BatchedRemoteMoE,
    ExpertCall,
    shutdown_dht,
    unroutable,
)
from coordinator_seeds.timeouts import CallTimeouts
from coordinator_seeds.trainer import StepReport, TrainerSettings, train
from tests.forkserver import server_context
from volunteer.core.manifest import Manifest, MoELayer
from volunteer.core.records import join_dht, read_trainer_progress, visible_maddrs
from volunteer.serving.experts import build_expert, sample_input

pytestmark = pytest.mark.integration

PREFIX = "ttrain"
D_MODEL = 32
D_HIDDEN = 64
BLOCK = "residual_ffn"
FROZEN = MoELayer("ttrain_frozen", (2, 2), "small")  # served by the lr-0 server only

MANIFEST = Manifest.from_dict({
    "schema_version": 1, "name": "trainer-test", "dht_prefix": PREFIX, "d_model": D_MODEL,
    "max_batch_size": 4096, "optimizer": {"name": "adam", "lr": 1e-3},
    "expert_types": [{"name": "small", "block": BLOCK, "d_hidden": D_HIDDEN}],
    "layers": [
        {"uid_prefix": "ttrain_ffn0", "grid": [2, 2], "expert_type": "small"},
        {"uid_prefix": "ttrain_ffn1", "grid": [2, 2], "expert_type": "small"},
    ],
    "trainer": {"seq_len": 32, "batch_size": 8, "k_best": 2, "lr": 3e-3},
})


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.2)


def _serve(conn: Connection, initial_peers: list[str], uids: list[str], lr: float) -> None:
    """Child process: serve ``uids`` (Adam, or SGD with lr 0 when ``lr`` is 0, so weights never move)
    until told to stop or the parent goes away; answers "weights" with the experts' state dicts."""
    os.setsid()  # its own process group: the parent can always kill everything the server started
    backends = {}
    for seed, uid in enumerate(uids):
        module = build_expert(BLOCK, D_MODEL, D_HIDDEN, seed=seed)
        optimizer = torch.optim.Adam(module.parameters(), lr=lr) if lr else torch.optim.SGD(module.parameters(), lr=0.0)
        schema = (BatchTensorDescriptor.from_tensor(sample_input(BLOCK, 1, D_MODEL)),)
        backends[uid] = ModuleBackend(name=uid, module=module, optimizer=optimizer, args_schema=schema,
                                      max_batch_size=4096)
    server = Server(join_dht(PREFIX, initial_peers), backends, num_connection_handlers=2, update_period=5,
                    start=True)
    try:
        conn.send([handler.pid for handler in server.conn_handlers])
        while (command := conn.recv()) != "stop":
            if command == "weights":
                buffer = io.BytesIO()  # plain bytes: tensors sent as such would go through shared memory
                torch.save({uid: b.module.state_dict() for uid, b in backends.items()}, buffer)
                conn.send(buffer.getvalue())
    except EOFError:
        pass  # the parent is gone
    finally:
        server.shutdown()
        server.join(timeout=10)


class ServerProcess:
    """A hivemind ``Server`` in a child process of its own.

    Not in the pytest process: hivemind's task pools share memory between the processes of a server,
    and torch aborts the whole process ("could not unlink the shared memory file") when a server dies
    under it, which we saw once in a full test run. A child can crash without taking the session along.
    """

    def __init__(self, initial_peers: list[str], uids: list[str], lr: float):
        context = server_context()
        self.uids = uids
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_conn, initial_peers, uids, lr))
        self.process.start()
        child_conn.close()
        self.handler_pids: list[int] = []

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"server of {self.uids} did not start within {timeout} s")
        self.handler_pids = self._conn.recv()
        return self

    def modules(self) -> dict[str, torch.nn.Module]:
        """Local copies of the served experts, with the server's current weights."""
        self._conn.send("weights")
        if not self._conn.poll(30.0):
            raise TimeoutError("the server did not send its weights within 30 s")
        states = torch.load(io.BytesIO(self._conn.recv()), weights_only=True)
        modules = {uid: build_expert(BLOCK, D_MODEL, D_HIDDEN) for uid in states}
        for uid, module in modules.items():
            module.load_state_dict(states[uid])
        return modules

    def freeze(self) -> None:
        """Stop the connection handlers: calls are accepted and never answered, like the orphaned
        handlers of a server killed without its process group (ENGINE-NOTES)."""
        self._signal_handlers(signal.SIGSTOP)

    def stop(self) -> None:
        if not self.process.is_alive():
            return
        self._signal_handlers(signal.SIGCONT)  # a stopped handler would never see its SIGTERM
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self.process.join(timeout=20)
        if self.process.is_alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.join(timeout=10)

    def _signal_handlers(self, signum: signal.Signals) -> None:
        for pid in self.handler_pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


@contextlib.contextmanager
def serving(initial_peers: list[str], *uid_groups: list[str], lr: float) -> Iterator[list[ServerProcess]]:
    """One server process per group of uids, started together; all stopped on exit."""
    servers: list[ServerProcess] = []
    try:
        servers.extend(ServerProcess(initial_peers, uids, lr) for uids in uid_groups)
        yield [server.wait_ready() for server in servers]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def peers() -> Iterator[list[str]]:
    bootstrap = join_dht(PREFIX)
    try:
        yield visible_maddrs(bootstrap)
    finally:
        bootstrap.shutdown()


@pytest.fixture(scope="module")
def client_dht(peers: list[str]) -> Iterator[DHT]:
    dht = join_dht(PREFIX, peers, client_mode=True)
    try:
        yield dht
    finally:
        shutdown_dht(dht)


@pytest.fixture(scope="module")
def frozen_server(peers: list[str]) -> Iterator[ServerProcess]:
    with serving(peers, FROZEN.uids(), lr=0.0) as (server,):
        yield server


@pytest.fixture(scope="module")
def training_servers(peers: list[str]) -> Iterator[list[ServerProcess]]:
    """Two Adam servers; each holds half of every layer's experts."""
    halves: tuple[list[str], list[str]] = ([], [])
    for layer in MANIFEST.layers:
        for i, uid in enumerate(layer.uids()):
            halves[i % 2].append(uid)
    with serving(peers, *halves, lr=MANIFEST.optimizer.lr) as servers:
        yield servers


def frozen_layer(client_dht: DHT, layer: MoELayer = FROZEN) -> BatchedRemoteMoE:
    torch.manual_seed(0)
    moe = BatchedRemoteMoE(D_MODEL, layer, client_dht, k_best=2, forward_timeout=5.0, backward_timeout=5.0)
    wait_until(lambda: len(moe.live.refresh()) >= 4, 20.0, "the frozen experts did not appear")
    return moe


def local_reference(moe: BatchedRemoteMoE, modules: dict[int, torch.nn.Module], x: torch.Tensor,
                    grad: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer computed locally: same gate and routing (``chosen``), the same expert modules (by grid
    index; a missing one counts as failed) on the same grouped tokens, weights renormalised over the
    experts that answered. Returns (output, input gradient)."""
    x = x.detach().clone().requires_grad_(True)
    logits = moe.gate(x)
    outputs = torch.zeros(len(x), chosen.shape[1], D_MODEL)
    answered = torch.zeros(chosen.shape, dtype=torch.bool)
    for index in chosen.unique().tolist():
        if index in modules:
            tokens, slots = (chosen == index).nonzero(as_tuple=True)
            outputs = outputs.index_put((tokens, slots), modules[index](x[tokens]))
            answered[tokens, slots] = True
    weights = torch.softmax(logits.gather(1, chosen).masked_fill(~answered, -math.inf), dim=-1)
    output = (weights.nan_to_num(0.0).unsqueeze(-1) * outputs).sum(dim=1)
    output.backward(grad)
    return output.detach(), x.grad


def local_copies(server: ServerProcess, layer: MoELayer) -> dict[int, torch.nn.Module]:
    """The server's experts of ``layer``, by grid index, with the weights they have now."""
    modules = server.modules()
    return {i: modules[uid] for i, uid in enumerate(layer.uids()) if uid in modules}


# --- dispatch ------------------------------------------------------------------------------------


def dispatched_and_reference(moe, frozen_server: ServerProcess) -> tuple[torch.Tensor, ...]:
    """A forward and backward of 200 tokens through ``moe``, and the same on local copies of the
    frozen server's experts: ``(output, input grad, expected output, expected input grad)``."""
    x = torch.randn(200, D_MODEL, requires_grad=True)
    grad = torch.randn(200, D_MODEL)
    chosen = moe.route(moe.gate(x).detach(), moe.live.current())
    output = moe(x)
    output.backward(grad)
    expected, expected_grad = local_reference(moe, local_copies(frozen_server, FROZEN), x, grad, chosen)
    return output.detach(), x.grad, expected, expected_grad


def test_dispatch_matches_local_reference(frozen_server: ServerProcess, client_dht: DHT) -> None:
    moe = frozen_layer(client_dht)
    output, x_grad, expected, expected_grad = dispatched_and_reference(moe, frozen_server)
    assert torch.allclose(output, expected, atol=1e-5)
    assert torch.allclose(x_grad, expected_grad, atol=1e-5)
    assert moe.gate.weight.grad is not None and torch.isfinite(moe.gate.weight.grad).all()


def test_dispatch_sends_in_the_experiments_wire_dtype(frozen_server: ServerProcess, client_dht: DHT) -> None:
    """float16 on the wire: the plain hivemind server reads the rounded inputs and gradients (it decodes
    whatever compression a request names), so the layer's answers are the reference's within the
    rounding (2^-10 of the largest value), and not float32's."""
    from volunteer.core.wire import compression, rounding_rtol

    moe = frozen_layer(client_dht)
    moe.wire = compression("float16")
    output, x_grad, expected, expected_grad = dispatched_and_reference(moe, frozen_server)
    for got, want in ((output, expected), (x_grad, expected_grad)):
        error = float((got - want).abs().max() / want.abs().max())
        assert 1e-6 < error <= 2 * rounding_rtol("float16"), error


def test_one_batched_call_per_chosen_expert_per_step(frozen_server: ServerProcess, client_dht: DHT) -> None:
    moe = frozen_layer(client_dht)
    for _ in range(2):
        x = torch.randn(4, 64, D_MODEL, requires_grad=True)  # [batch, seq, d]: 256 tokens, k=2
        chosen = moe.route(moe.gate(x.reshape(-1, D_MODEL)).detach(), moe.live.current())
        experts = len(chosen.unique())
        ok_before = moe.calls_ok
        output = moe(x)
        assert output.shape == x.shape
        assert moe.calls_ok - ok_before == experts  # not one per token (512 token-expert pairs)
        output.sum().backward()
        assert moe.calls_ok - ok_before == 2 * experts
    assert moe.calls_failed == 0 and moe.last_live_count == 4


def test_failed_expert_is_dropped_and_weights_renormalised(frozen_server: ServerProcess, peers: list[str]) -> None:
    """A grid with two more uids than the server holds; one of them is declared by a peer that serves
    nothing, so every call to it fails. Its tokens must get the other expert's output alone."""
    ghost_host = join_dht(PREFIX, peers)
    dht = join_dht(PREFIX, peers, client_mode=True)
    try:
        wider = MoELayer(FROZEN.uid_prefix, (2, 3), "small")  # uids .0.2 and .1.2 exist nowhere
        assert all(declare_experts(ghost_host, ["ttrain_frozen.0.2"], get_dht_time() + 30).values())
        moe = BatchedRemoteMoE(D_MODEL, wider, dht, k_best=2, forward_timeout=5.0, backward_timeout=5.0)
        wait_until(lambda: len(moe.live.refresh()) == 5, 20.0, "the ghost expert was not listed")
        ghost = wider.uids().index("ttrain_frozen.0.2")
        with torch.no_grad():
            moe.gate.bias[ghost] = 10.0  # every token routes to the ghost first
        x = torch.randn(64, D_MODEL, requires_grad=True)
        grad = torch.randn(64, D_MODEL)
        chosen = moe.route(moe.gate(x).detach(), moe.live.current())
        started = time.monotonic()
        output = moe(x)
        output.backward(grad)
        assert time.monotonic() - started < 10.0
        assert moe.calls_failed == 1 and ghost not in moe.live.current()
        assert moe.last_live_count == 4

        reference = local_reference(moe, local_copies(frozen_server, wider), x, grad, chosen)
        assert torch.allclose(output.detach(), reference[0], atol=1e-5)
        assert torch.allclose(x.grad, reference[1], atol=1e-5)
    finally:
        shutdown_dht(dht)
        ghost_host.shutdown()


# --- trainer -------------------------------------------------------------------------------------


def settings(peers: list[str], steps: int, **overrides) -> TrainerSettings:
    overrides.setdefault("idle_wait", 0.0)  # tests that kill every server keep stepping, as before
    overrides.setdefault("signed_only", False)  # plain hivemind servers: no signed records, no commitments
    return TrainerSettings(manifest=MANIFEST, initial_peers=tuple(peers), steps=steps, expert_wait=20.0,
                           **overrides)


def served_weights(servers: list[ServerProcess]) -> dict[str, torch.Tensor]:
    return {uid: torch.cat([p.detach().flatten() for p in module.parameters()])
            for server in servers for uid, module in server.modules().items()}


def test_trainer_loss_falls_and_served_experts_learn(
    training_servers: list[ServerProcess], peers: list[str], client_dht: DHT, caplog: pytest.LogCaptureFixture,
) -> None:
    before = served_weights(training_servers)
    with caplog.at_level(logging.INFO, logger="coordinator_seeds.trainer"):
        reports = train(settings(peers, steps=60))

    assert [r.step for r in reports] == list(range(1, 61))
    assert not any(r.skipped for r in reports)
    # every step's micro-batches (the default in_flight, 4) were in flight together
    assert all(r.together == TrainerSettings.in_flight == 4 for r in reports), [r.together for r in reports]
    assert all(r.experts_alive == 8 for r in reports)
    first, last = (sum(r.loss for r in part) / len(part) for part in (reports[:10], reports[-10:]))
    assert last < first - 0.3, f"loss fell only from {first:.2f} to {last:.2f}"
    after = served_weights(training_servers)
    assert all(not torch.equal(before[uid], after[uid]) for uid in before), "some served expert never trained"
    assert any(r.getMessage().startswith("step 60 loss ") and "experts alive 8 of 8," in r.getMessage()
               for r in caplog.records)
    progress = read_trainer_progress(client_dht, PREFIX)
    assert progress is not None and progress.step == 60 and math.isfinite(progress.loss)


def test_trainer_survives_servers_dying(training_servers: list[ServerProcess], peers: list[str]) -> None:
    """Server B shuts down after step 3 (its calls then fail at once); server A hangs after step 6 (its
    calls time out). Every step still completes with a finite loss, within the timeouts; with every
    expert gone the tokens pass through the MoE layers."""
    server_a, server_b = training_servers
    timeout = 2.0

    def on_step(report: StepReport) -> None:
        if report.step == 3:
            server_b.stop()
        elif report.step == 6:
            server_a.freeze()

    # one step at a time: which step meets which failure is the point here
    reports = train(settings(peers, steps=10, forward_timeout=timeout, backward_timeout=timeout,
                             publish_progress=False, in_flight=1), on_step=on_step)

    assert [r.step for r in reports] == list(range(1, 11))
    assert all(math.isfinite(r.loss) and not r.skipped for r in reports)
    assert reports[2].experts_alive == 8
    assert 0 < reports[5].experts_alive < 8  # B's experts were evicted once their calls failed
    assert reports[6].seconds > timeout  # step 7 waited for A's frozen handlers...
    assert all(r.seconds < len(MANIFEST.layers) * timeout + 5.0 for r in reports)  # ...but no longer
    assert all(r.experts_alive == 0 for r in reports[6:])  # evicted, and not re-admitted by a refresh


def test_with_no_expert_alive_the_trainer_waits_instead_of_stepping(
    peers: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15.5: with 0 experts alive the trainer printed losses at 140 steps/s, training only its local
    layers. Now, at a log step with nothing alive, it says so and waits for volunteers (stop still ends it)."""
    nobody = replace(MANIFEST, layers=tuple(replace(layer, uid_prefix=f"nobody{i}")
                                            for i, layer in enumerate(MANIFEST.layers)))
    steps: list[int] = []
    stop = threading.Event()
    trainer = threading.Thread(target=train, daemon=True, kwargs=dict(
        settings=TrainerSettings(nobody, tuple(peers), log_every=2, expert_wait=0.5, idle_wait=120.0,
                                 publish_progress=False),
        on_step=lambda report: steps.append(report.step), stop=stop))
    with caplog.at_level(logging.INFO, logger="coordinator_seeds.trainer"):
        trainer.start()
        try:
            wait_until(lambda: any("no expert is alive" in r.getMessage() for r in caplog.records), 90,
                       "the trainer's warning that no expert is alive")
            time.sleep(3.0)  # time passing is the point: no step may be taken while it waits
            assert steps == [1, 2]
            assert any("experts alive 0 of " in r.getMessage() for r in caplog.records)
        finally:
            stop.set()
            trainer.join(timeout=60)
    assert not trainer.is_alive(), "a stop did not end the wait for volunteers"


# --- timeouts and eviction -------------------------------------------------------------------------


def test_call_timeouts_follow_the_calls_seen() -> None:
    timeouts = CallTimeouts(10.0, floor=2.0, factor=3.0, slack=1.0, window=8)
    assert timeouts.current() == 10.0  # nothing seen yet: the ceiling
    for seconds in (0.05, 0.04, 0.06, 0.05):
        timeouts.observe(seconds)
    assert timeouts.current() == 2.0  # loopback-fast calls: the floor, not 10 s
    for _ in range(4):
        timeouts.observe(1.5)  # 100 ms away, a 512 KiB call
    assert timeouts.current() == pytest.approx(5.5)
    timeouts.observe(60.0)
    assert timeouts.current() == 10.0  # never above the ceiling
    for _ in range(8):
        timeouts.observe(0.05)
    assert timeouts.current() == 2.0  # the slow calls left the window


def test_an_unroutable_server_is_evicted_briefly(client_dht: DHT) -> None:
    from hivemind.p2p import P2PDaemonError

    assert unroutable(P2PDaemonError("routing: not found")) and not unroutable(TimeoutError())
    moe = BatchedRemoteMoE(D_MODEL, FROZEN, client_dht, k_best=2, evict_for=30.0)
    now = [100.0]
    moe.live.clock = lambda: now[0]
    expert = RemoteExpert(ExpertInfo(FROZEN.uids()[0], PeerID.from_base58(client_dht.peer_id.to_base58())), None)
    call = ExpertCall(expert, torch.arange(3), torch.zeros(3, dtype=torch.long))
    moe.record(call, False, P2PDaemonError("routing: not found"))
    assert moe.live._evicted[expert.uid, str(expert.peer_id)] == 100.0 + UNROUTABLE_EVICTION
    moe.record(call, False, TimeoutError())
    assert moe.live._evicted[expert.uid, str(expert.peer_id)] == 130.0
