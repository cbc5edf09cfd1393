"""Malformed requests to a real volunteer from a plain hivemind client; it keeps serving and counts only good ones."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch

from tests.conftest import Processes, serving_event, status, wait_for
from tests.hostile.common import (
    FAST,
    MANIFEST,
    fresh_checkpoint,
    new_coordinator,
    snapshot,
)
from volunteer.core import records
from volunteer.core.harness import start_volunteer
from volunteer.core.seed_client import fetch_experiment
from volunteer.node.stats import LifetimeStore, Totals
from volunteer.serving.checkpoints import CheckpointStore

# --- malformed requests to a real volunteer, from a plain hivemind client ---------------------------

UID = "testlm_ffn0.1.3"  # pinned through node.json, so its checkpoints can be planted before the start
LIFETIME_BEFORE = Totals(forward_samples=1000, backward_samples=100, optimizer_steps=10)


@dataclass
class Served:
    home: Path
    child: Any
    event: dict
    expert: Any  # hivemind RemoteExpert
    max_batch_size: int
    planted: dict[str, bytes]  # the corrupt files planted before the start
    cache_before: dict[str, tuple[bytes, int]]


def _plant_state(home: Path) -> dict[str, bytes]:
    """node.json pins UID; its latest checkpoint is truncated (the previous one is whole); lifetime.json
    is truncated (its backup is whole). All must be survived without losing data."""
    (home / "state").mkdir(parents=True, exist_ok=True)
    (home / "state" / "node.json").write_text(json.dumps({"experiment": "test-lm", "uids": [UID]}))
    store = CheckpointStore(home / "data" / "checkpoints" / "test-lm")
    store.save(fresh_checkpoint(UID, 5))
    latest = store.save(fresh_checkpoint(UID, 9))
    truncated = latest.read_bytes()[: latest.stat().st_size // 2]
    latest.write_bytes(truncated)
    lifetime = LifetimeStore(home / "state" / "lifetime.json")
    lifetime.save(LIFETIME_BEFORE)
    lifetime.save(Totals(forward_samples=1001))  # the first one becomes lifetime.json.prev
    lifetime.path.write_bytes(b'{"forward_samples": 10')
    return {"checkpoint": truncated, "lifetime": b'{"forward_samples": 10'}


@pytest.fixture(scope="module")
def served(seed) -> Iterator[Served]:
    """One ``volunteer start --max-experts 1`` for every request below. Its coordinator is a proxy of the
    seed that answered once (seeding the cache) and is down by the time the volunteer starts, so the
    volunteer also proves it falls back to the cached manifest and peers."""
    from hivemind.moe import get_experts

    from coordinator_seeds.dispatch import shutdown_dht

    url, experiment = seed
    home = Path(tempfile.mkdtemp(prefix="vol-"))  # unix socket paths must stay under 107 bytes
    procs, dht, proxy = Processes(), None, new_coordinator()
    try:
        for path in ("/v1/experiment", "/v1/peers"):
            proxy.answer(path, body=httpx.get(f"{url}{path}", timeout=10).content)
        fetch_experiment(proxy.url, home / "cache", **FAST)
        cache_before = snapshot(home / "cache")
        proxy.stop()
        planted = _plant_state(home)
        child = procs.add(start_volunteer(home, proxy.url, "--max-experts", "1", "--log-interval", "60"))
        event = serving_event(child)
        dht = records.join_dht(experiment.manifest.dht_prefix, experiment.initial_peers, client_mode=True)
        expert = wait_for(lambda: get_experts(dht, [UID])[0], 30, f"{UID} in the DHT")
        yield Served(home, child, event, expert, event["plans"][0]["max_batch_size"], planted, cache_before)
    finally:
        proxy.stop()
        if dht is not None:
            shutdown_dht(dht)
        procs.stop_all()
        shutil.rmtree(home, ignore_errors=True)


def raw_call(served: Served, rpc: str, tensors: list, uid: str | None = None,
             timeout: float = 15.0) -> list[torch.Tensor]:
    """One rpc_forward/rpc_backward with exactly these tensors: hivemind's client-side checks bypassed."""
    from hivemind.compression import serialize_torch_tensor
    from hivemind.moe.client.expert import expert_backward, expert_forward
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.proto import runtime_pb2

    none = runtime_pb2.CompressionType.NONE
    serialized = [t if isinstance(t, runtime_pb2.Tensor) else serialize_torch_tensor(t, none) for t in tensors]
    plain = [t for t in tensors if isinstance(t, torch.Tensor)]
    if rpc.startswith("audited "):  # the project's audited handlers (VolunteerAudit.*), same checks
        from coordinator_seeds.replicas import audited_rpc
        from volunteer.core.audit_check import AUDITED_BACKWARD, AUDITED_FORWARD

        call = audited_rpc(AUDITED_FORWARD if rpc == "audited forward" else AUDITED_BACKWARD)
    else:
        call = expert_forward if rpc == "forward" else expert_backward
    future = RemoteExpertWorker.run_coroutine(call(uid or served.expert.uid, plain, serialized, served.expert.stub),
                                              return_future=True)
    try:
        return future.result(timeout)
    finally:
        future.cancel()  # a call left hanging must not outlive the test


def _proto(size: list[int], dtype: str, buffer: bytes):
    from hivemind.proto import runtime_pb2

    return runtime_pb2.Tensor(buffer=buffer, size=size, dtype=dtype, compression=runtime_pb2.CompressionType.NONE)


D = MANIFEST.d_model
STREAMED = 2**21 // (4 * D) + 1  # rows of a request above hivemind's unary payload size (2 MiB)

# id, rpc, tensors(max_batch_size) -> list, uid override
REJECTED = [
    ("forward-last-dim-31", "forward", lambda m: [torch.randn(3, D - 1)], None),
    ("forward-rank-3-last-dim-1", "forward", lambda m: [torch.randn(3, D, 1)], None),
    ("forward-0-d-scalar", "forward", lambda m: [torch.tensor(1.0)], None),
    ("forward-float64", "forward", lambda m: [torch.randn(3, D, dtype=torch.float64)], None),
    ("forward-int64", "forward", lambda m: [torch.ones(3, D, dtype=torch.int64)], None),
    ("forward-over-max-batch-size", "forward", lambda m: [torch.randn(m + 1, D)], None),
    ("forward-no-tensors", "forward", lambda m: [], None),
    ("forward-shape-claims-1e9-rows", "forward", lambda m: [_proto([10**9, D], "float32", b"\x00" * 12)], None),
    ("forward-object-dtype", "forward", lambda m: [_proto([3, D], "object", b"\x00" * 8 * 3 * D)], None),
    ("forward-unknown-uid", "forward", lambda m: [torch.randn(3, D)], "testlm_ffn9.9.9"),
    ("backward-last-dim-31", "backward", lambda m: [torch.randn(3, D - 1), torch.randn(3, D - 1)], None),
    ("backward-grad-batch-differs", "backward", lambda m: [torch.randn(3, D), torch.randn(4, D)], None),
    ("backward-float64", "backward",
     lambda m: [torch.randn(3, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)], None),
    ("backward-no-grad", "backward", lambda m: [torch.randn(3, D)], None),
    # the same requests to the audited handlers, which the lean path's device worker computes too
    ("audited-forward-last-dim-31", "audited forward", lambda m: [torch.randn(3, D - 1)], None),
    ("audited-forward-float64", "audited forward", lambda m: [torch.randn(3, D, dtype=torch.float64)], None),
    ("audited-forward-over-max-batch-size", "audited forward", lambda m: [torch.randn(m + 1, D)], None),
    ("audited-forward-no-tensors", "audited forward", lambda m: [], None),
    ("audited-forward-nan", "audited forward", lambda m: [torch.full((3, D), float("nan"))], None),
    ("audited-forward-unknown-uid", "audited forward", lambda m: [torch.randn(3, D)], "testlm_ffn9.9.9"),
    ("audited-backward-grad-batch-differs", "audited backward",
     lambda m: [torch.randn(3, D), torch.randn(4, D)], None),
    ("audited-backward-no-grad", "audited backward", lambda m: [torch.randn(3, D)], None),
    # above hivemind's unary payload size: the streaming forms (VolunteerAudit.rpc_*_stream), same checks
    ("audited-forward-streamed-over-max-batch-size", "audited forward", lambda m: [torch.randn(STREAMED, D)], None),
    ("audited-backward-streamed-last-dim-31", "audited backward",
     lambda m: [torch.randn(STREAMED, D - 1), torch.randn(STREAMED, D - 1)], None),
]


@pytest.mark.integration
def test_volunteer_starts_from_the_cache_and_survives_corrupt_state(served: Served):
    output = "".join(served.child.output)
    assert "unreachable after 4 attempts (connection refused)" in output and "using the experiment cached" in output
    assert served.event["uids"] == [UID] and served.event["restored"] == [UID]
    # the cached experiment is untouched (the cache dir also holds other things, such as throughput figures)
    cached = snapshot(served.home / "cache")
    assert {name: cached.get(name) for name in served.cache_before} == served.cache_before

    checkpoints = served.home / "data" / "checkpoints" / "test-lm"
    [aside] = [p for p in checkpoints.iterdir() if p.name.startswith(f"{UID}.pt.corrupt-")]
    assert aside.read_bytes() == served.planted["checkpoint"]
    [aside] = [p for p in (served.home / "state").iterdir() if p.name.startswith("lifetime.json.corrupt-")]
    assert aside.read_bytes() == served.planted["lifetime"]

    figures = status(served.home)
    [mine] = [e["stats"] for e in figures["experts"]]
    assert mine["optimizer_steps"] == 5, "restored from the whole previous checkpoint, not the truncated latest"
    assert figures["lifetime"]["forward_samples"] == LIFETIME_BEFORE.forward_samples, "counted on from the backup"


@pytest.mark.integration
@pytest.mark.parametrize("rpc, make, uid", [pytest.param(r, t, u, id=i) for i, r, t, u in REJECTED])
def test_malformed_request_is_rejected(served: Served, rpc: str, make, uid: str | None):
    from hivemind.p2p import P2PHandlerError

    with pytest.raises(P2PHandlerError):
        raw_call(served, rpc, make(served.max_batch_size), uid=uid)
    assert served.child.proc.poll() is None, served.child.tail(20)


@pytest.mark.integration
@pytest.mark.parametrize("uid, asked", [(UID, b"not msgpack \xc1"), (UID, b"\xff\xfe"), (UID, b"-1"),
                                        (UID, "request:99999"), (UID, "request:-1"), (UID, "kind:sideways"),
                                        ("testlm_ffn9.9.9", "request:0")])
def test_a_reveal_of_what_is_not_kept_answers_nothing(served: Served, uid: str, asked):
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.proto import runtime_pb2
    from hivemind.utils import MSGPackSerializer

    from volunteer.core.audit_check import REVEAL_RPC, RevealRequest

    if asked == "kind:sideways":
        asked = MSGPackSerializer.dumps([0, "sideways", 0, b""])
    elif isinstance(asked, str):
        asked = RevealRequest(int(asked.split(":")[1])).to_bytes()
    stub = served.expert.stub
    request = runtime_pb2.ExpertRequest(uid=uid, metadata=asked)

    async def ask() -> list:
        stream = await stub._p2p.iterate_protobuf_handler(stub._peer, REVEAL_RPC, request, runtime_pb2.ExpertResponse)
        return [message async for message in stream]

    future = RemoteExpertWorker.run_coroutine(ask(), return_future=True)
    try:
        assert [m.metadata for m in future.result(15.0)] == [b""]
    finally:
        future.cancel()
    assert served.child.proc.poll() is None, served.child.tail(20)


@pytest.mark.integration
def test_after_the_bad_requests_it_still_serves_and_counts_only_good_ones(served: Served):
    before = status(served.home)
    assert before["session"]["forward_samples"] == 0 and before["session"]["backward_samples"] == 0, \
        "a rejected request was counted"
    with torch.no_grad():
        (out,) = raw_call(served, "forward", [torch.randn(5, D)])
    assert out.shape == (5, D) and torch.isfinite(out).all()
    x = torch.randn(7, D, requires_grad=True)
    served.expert(x).sum().backward()  # the plain hivemind client, autograd and all
    assert x.grad is not None and x.grad.shape == (7, D) and torch.isfinite(x.grad).all()

    figures = status(served.home)
    assert figures["state"] == "serving" and served.child.proc.poll() is None
    [mine] = [e["stats"] for e in figures["experts"]]
    assert (mine["forward_samples"], mine["backward_samples"]) == (5 + 7, 7)
    assert (mine["forward_batches"], mine["backward_batches"]) == (2, 1)
    assert figures["session"]["forward_samples"] == 12 and figures["session"]["backward_samples"] == 7
    assert figures["lifetime"]["forward_samples"] == LIFETIME_BEFORE.forward_samples + 12


# --- requests a volunteer must refuse: hivemind checks none of this (serving.CheckedTaskPool does) -----

@pytest.mark.integration
@pytest.mark.parametrize("tensors", [
    pytest.param(lambda: [torch.randn(D)], id="forward-rank-1"),
    pytest.param(lambda: [torch.randn(3, 4, D)], id="forward-rank-3"),
    pytest.param(lambda: [torch.full((3, D), float("nan"))], id="forward-nan"),
    pytest.param(lambda: [torch.full((3, D), float("inf"))], id="forward-inf"),
])
def test_malformed_forward_is_refused(served: Served, tensors):
    from hivemind.p2p import P2PHandlerError

    with pytest.raises(P2PHandlerError):
        raw_call(served, "forward", tensors())


@pytest.mark.integration
def test_nan_gradients_are_refused_and_do_not_poison_the_expert(served: Served):
    from hivemind.p2p import P2PHandlerError

    try:
        with pytest.raises(P2PHandlerError):
            raw_call(served, "backward", [torch.randn(3, D), torch.full((3, D), float("nan"))])
    finally:
        (out,) = raw_call(served, "forward", [torch.randn(2, D)])
        poisoned = not torch.isfinite(out).all()
    assert not poisoned


@pytest.mark.integration
def test_empty_batch_is_refused_at_once(served: Served):
    from hivemind.p2p import P2PHandlerError

    with pytest.raises(P2PHandlerError):
        raw_call(served, "forward", [torch.randn(0, D)], timeout=3)


@pytest.mark.integration
def test_a_burst_mixing_bad_and_good_requests_does_not_kill_the_expert(served: Served):
    """A wrong-shaped task batched with good ones once made torch.cat kill the pool's loop."""
    from hivemind.compression import serialize_torch_tensor
    from hivemind.moe.client.expert import expert_forward
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.proto import runtime_pb2

    def send(x: torch.Tensor):
        serialized = [serialize_torch_tensor(x, runtime_pb2.CompressionType.NONE)]
        return RemoteExpertWorker.run_coroutine(expert_forward(UID, [x], serialized, served.expert.stub),
                                                return_future=True)

    futures = [send(torch.randn(3, D if i % 2 else D - 1)) for i in range(40)]
    done, pending = concurrent.futures.wait(futures, timeout=8)
    for future in pending:
        future.cancel()
    assert not pending, f"{len(pending)} of 40 requests unanswered after 8 s"
    good = [f.result() for i, f in enumerate(futures) if i % 2]
    assert all(out[0].shape == (3, D) for out in good)
    assert all(f.exception() is not None for i, f in enumerate(futures) if not i % 2)
    (out,) = raw_call(served, "forward", [torch.randn(2, D)], timeout=5)
    assert out.shape == (2, D)
