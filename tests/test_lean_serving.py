"""The lean serving path (``serving.handler``) against a plain hivemind client, on real peers.

A ``LeanServer`` serves one expert of every allowlisted block on 127.0.0.1; a separate client peer finds
them with hivemind's ``get_experts`` and calls them through ``RemoteExpert`` (forward, autograd
backward, the streaming forms for large tensors). Answers must match local torch on the same initial
weights (the backward running on its forward's kept graph), the experts must train, a pause must refuse, and a dead worker must show in ``failure()``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import grid_manifest, wait_for
from volunteer.core import records
from volunteer.core.manifest import loads
from volunteer.serving.backends import build_backends
from volunteer.serving.batching import served_rate
from volunteer.serving.checkpoints import CheckpointStore
from volunteer.serving.handler import LeanServer

MANIFEST = loads(grid_manifest("leantest", [(1, 1)] * 3, d_model=32, max_batch_size=4096, lr=0.01, expert_types={
    "plain": ("ffn", 128), "residual": ("residual_ffn", 64), "gated": ("swiglu_ffn", 48)}), fmt="toml")
UIDS = MANIFEST.all_uids()
MAX_BATCH = 20000
D = MANIFEST.d_model


@dataclass
class Swarm:
    server: LeanServer
    experts: dict  # uid -> hivemind RemoteExpert, as a trainer gets it
    fresh: dict  # uid -> a local copy of the expert's initial module


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[Swarm]:
    from hivemind.moe import get_experts

    from coordinator_seeds.dispatch import shutdown_dht

    store = CheckpointStore(Path(tmp_path_factory.mktemp("checkpoints")))
    backends, _ = build_backends(MANIFEST, UIDS, MAX_BATCH, store, pools=False)
    fresh = {uid: copy.deepcopy(b.module) for uid, b in backends.items()}
    server_dht = records.join_dht(MANIFEST.dht_prefix)
    client = server = None
    try:
        # two devices' worth of workers on the CPU: the several-device path, one worker per device
        server = LeanServer(server_dht, backends, [("cpu", UIDS[:2]), ("cpu", UIDS[2:])], update_period=5)
        server.run_in_background(timeout=60)
        client = records.join_dht(MANIFEST.dht_prefix, [str(m) for m in server_dht.get_visible_maddrs()],
                                  client_mode=True)
        found = wait_for(lambda: (lambda e: e if all(e) else None)(get_experts(client, UIDS)), 30, "experts")
        yield Swarm(server, dict(zip(UIDS, found)), fresh)
    finally:
        if server is not None:
            server.shutdown()
            server.join(10)
        else:
            server_dht.shutdown()
        if client is not None:
            shutdown_dht(client)


def _local(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad


@pytest.mark.integration
@pytest.mark.parametrize("uid", UIDS)
def test_a_plain_hivemind_client_gets_what_local_torch_computes(swarm: Swarm, uid: str):
    """Forward and backward of every expert type through RemoteExpert equal local torch on the same
    weights; each backward was one optimizer step on the volunteer, so the fresh copy is compared first."""
    torch.manual_seed(0)
    x, grad = torch.randn(17, D), torch.randn(17, D)
    want_out, want_grad = _local(swarm.fresh[uid], x, grad)
    kept = swarm.server.module_backends[uid].kept
    hits = kept.hits
    remote = x.clone().requires_grad_(True)
    out = swarm.experts[uid](remote)
    out.backward(grad)
    torch.testing.assert_close(out.detach(), want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(remote.grad, want_grad, rtol=1e-4, atol=1e-5)
    assert swarm.server.module_backends[uid].counters.snapshot().optimizer_steps >= 1
    assert kept.hits == hits + 1  # the backward used its forward's graph: no recompute


@pytest.mark.integration
def test_large_requests_take_the_streaming_rpcs(swarm: Swarm):
    """A request over hivemind's message size goes through rpc_forward_stream / rpc_backward_stream."""
    from hivemind.p2p.p2p_daemon_bindings.control import MAX_UNARY_PAYLOAD_SIZE

    uid = UIDS[1]
    rows = MAX_UNARY_PAYLOAD_SIZE // (4 * D) + 100  # more bytes than a unary call carries
    assert rows <= MAX_BATCH
    x = torch.randn(rows, D, requires_grad=True)
    backend = swarm.server.module_backends[uid]
    with backend.lock:
        module = copy.deepcopy(backend.module)
    want_out, _ = _local(module, x, torch.ones(rows, D))
    out = swarm.experts[uid](x)
    torch.testing.assert_close(out.detach(), want_out, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert x.grad.shape == (rows, D) and torch.isfinite(x.grad).all()


@pytest.mark.integration
def test_the_experts_train_through_the_lean_path(swarm: Swarm):
    """A regression target through the remote expert: the loss falls as its backward calls train it."""
    uid = UIDS[2]
    torch.manual_seed(1)
    target = torch.nn.Linear(D, D)
    x = torch.randn(64, D)
    with torch.no_grad():
        y = target(x)
    losses = []
    for _ in range(200):
        inputs = x.clone().requires_grad_(True)
        loss = torch.nn.functional.mse_loss(swarm.experts[uid](inputs), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::20]


@pytest.mark.integration
def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(swarm: Swarm):
    import concurrent.futures

    uid = UIDS[0]
    backend = swarm.server.module_backends[uid]
    before = backend.counters.snapshot()
    inputs = [torch.full((i + 1, D), float(i)) for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        with torch.no_grad():
            outputs = list(pool.map(swarm.experts[uid], inputs))
    with backend.lock, torch.no_grad():
        want = [backend.module(x) for x in inputs]
    for got, expected in zip(outputs, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    after = backend.counters.snapshot()
    assert after.forward_samples - before.forward_samples == sum(range(1, 25))
    assert after.forward_batches - before.forward_batches <= 24


@pytest.mark.integration
def test_the_served_rate_is_measured_through_the_serving_path(swarm: Swarm):
    readings = swarm.server.served()
    assert len(readings) == 2 and all(samples > 0 and busy > 0 for samples, busy in readings)
    assert served_rate([(1000, 4.0), (300, 3.0)]) == pytest.approx(250 + 100)
    assert served_rate([(1000, 4.0), (10, 3.0)]) is None, "a device with too little served keeps the local figure"


@pytest.mark.integration
def test_a_paused_expert_refuses_and_the_caller_sees_why(swarm: Swarm):
    from hivemind.p2p import P2PHandlerError

    uid = UIDS[0]
    backend = swarm.server.module_backends[uid]
    before = backend.counters.snapshot()
    backend.paused.set()
    try:
        with pytest.raises(P2PHandlerError, match="paused"), torch.no_grad():
            swarm.experts[uid](torch.randn(3, D))
    finally:
        backend.paused.clear()
    assert backend.counters.snapshot() == before, "a refused request was counted"
    with torch.no_grad():
        assert swarm.experts[uid](torch.randn(3, D)).shape == (3, D)


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected death
def test_a_dead_worker_is_noticed_and_its_callers_are_not_left_waiting(swarm: Swarm):
    """Runs last: it kills the worker of the second device (SystemExit from the expert's module)."""
    import concurrent.futures

    from hivemind.p2p import P2PHandlerError

    uid = UIDS[2]
    assert swarm.server.failure() is None
    backend = swarm.server.module_backends[uid]

    def die(*args, **kwargs):
        raise SystemExit("injected fault: the worker thread dies")

    backend.module.forward = die
    with pytest.raises((P2PHandlerError, concurrent.futures.TimeoutError)), torch.no_grad():
        swarm.experts[uid](torch.randn(3, D))
    problem = wait_for(swarm.server.failure, 10, "the dead worker noticed")
    assert "worker thread" in problem and "died" in problem
    with pytest.raises(P2PHandlerError, match="not running"), torch.no_grad():
        swarm.experts[uid](torch.randn(3, D))
