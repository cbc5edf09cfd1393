"""Audits over real p2p streams (issue 14's WAN gap): a lean server of the lab's expert size (residual_ffn
256/256 with Adam) answers audited calls above hivemind's unary payload size through the streaming forms,
and streams its reveals; the trainer's auditor receives them within their byte budget and every check
passes. One server and one client DHT in this process, on 127.0.0.1 (about 10 s on two shared cores).
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from hivemind.moe.client.expert import create_remote_experts
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p.p2p_daemon_bindings.control import MAX_UNARY_PAYLOAD_SIZE
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from coordinator_seeds.audit import AuditedCall, Auditor, AuditSettings
from coordinator_seeds.dispatch import call_experts, shutdown_dht
from coordinator_seeds.replicas import audited_rpc
from volunteer.core.audit_check import (
    AUDITED_BACKWARD,
    AUDITED_FORWARD,
    FORWARD_COMMIT,
    Commitment,
    ExpertSpec,
)
from volunteer.core.expert_modules import build_expert, build_optimizer
from volunteer.core.records import join_dht, visible_maddrs
from volunteer.serving.counters import ExpertCounters
from volunteer.serving.handler import LeanServer
from volunteer.serving.versions import AuditedBackend, RevealService

pytestmark = pytest.mark.integration

PREFIX, UID = "trevealstream", "trevealstream_ffn0.0.0"
SPEC = ExpertSpec("residual_ffn", 256, 256, "adam", 1e-3)  # the network lab's expert
ROWS = MAX_UNARY_PAYLOAD_SIZE // (4 * SPEC.d_model) + 64  # one forward's inputs above the unary size


@pytest.fixture(scope="module")
def served() -> Iterator[tuple]:
    server_dht = join_dht(PREFIX)
    module = build_expert(SPEC.block, SPEC.d_model, SPEC.d_hidden)
    backend = AuditedBackend(UID, module, optimizer=build_optimizer(SPEC.optimizer, module.parameters(), SPEC.lr),
                             expert_type="small", counters=ExpertCounters(UID, "small"),
                             args_schema=(BatchTensorDescriptor.from_tensor(torch.empty(1, SPEC.d_model)),),
                             min_batch_size=1, max_batch_size=4096, pools=False)
    server = LeanServer(server_dht, {UID: backend}, [("cpu", [UID])], update_period=30)
    reveals = None
    client = None
    try:
        server.run_in_background(timeout=60)
        reveals = RevealService(server_dht, {UID: backend}, server.handler.workers)
        reveals.run_in_background()
        client = join_dht(PREFIX, visible_maddrs(server_dht), client_mode=True)
        (expert,) = create_remote_experts([ExpertInfo(UID, server_dht.peer_id)], client)
        yield expert, reveals
    finally:
        if reveals is not None:
            reveals.shutdown()
        server.shutdown()
        if client is not None:
            shutdown_dht(client)
        shutdown_dht(server_dht)


def test_audited_calls_above_the_unary_size_stream_and_their_reveals_check_out(served) -> None:
    expert, reveals = served
    x = torch.randn(ROWS, SPEC.d_model)
    assert x.numel() * 4 > MAX_UNARY_PAYLOAD_SIZE
    [forward] = call_experts([(expert, [x])], audited_rpc(AUDITED_FORWARD), 60.0)
    assert not isinstance(forward, BaseException), forward
    output, rows = forward
    assert output.shape == x.shape and rows.shape == (ROWS, FORWARD_COMMIT)
    g = torch.randn_like(x) * 1e-2
    call_experts([(expert, [x[:8], g[:8]])], audited_rpc(AUDITED_BACKWARD), 60.0)  # then Adam has moments
    [backward] = call_experts([(expert, [x, g])], audited_rpc(AUDITED_BACKWARD), 60.0)
    assert not isinstance(backward, BaseException), backward
    grad, rows2 = backward
    assert grad.shape == x.shape
    commits = (Commitment.of_row(rows2[0, :FORWARD_COMMIT]), Commitment.of_row(rows2[0, FORWARD_COMMIT:]))
    auditor = Auditor({UID: SPEC}, AuditSettings(rate=1.0, seed=0))
    try:
        assert auditor.sample(lambda: AuditedCall(UID, "QmServer", "key", expert, "forward", x, output,
                                                  (Commitment.of_row(rows[0]),)))
        assert auditor.sample(lambda: AuditedCall(UID, "QmServer", "key", expert, "backward", x, grad, commits,
                                                  g))
        assert auditor.wait_idle(120)
        assert auditor.verdicts() == {"QmServer": (2, 2)}, auditor.failures
        sizes = sorted(size for _, size, _ in auditor.reveals)
        print(f"streamed reveals on loopback: {auditor.summary()}; bytes {sizes}")
        weights = sum(p.numel() * 4 for p in build_expert(SPEC.block, SPEC.d_model, SPEC.d_hidden).parameters())
        # forward: the weights alone; backward: the before state (weights, Adam's two moments and step
        # counters) and the after weights, none of the trainer's own rows (the batch was its call alone)
        assert sizes[0] == weights
        assert 0 <= sizes[1] - 4 * weights <= 1024
    finally:
        auditor.shutdown()
    assert reveals.revealed == 2
