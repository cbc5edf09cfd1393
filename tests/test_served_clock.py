"""The served rate (``serving.served``) on both serving paths: what the node announces and balances on.

On hivemind's path the requests arrive in connection-handler processes that hivemind forks, so the
device's clock lives in shared memory; a plain hivemind client's calls must show up in the node's
reading. ~6 s (one hivemind ``Server`` on 127.0.0.1)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from tests.conftest import grid_manifest, wait_for
from volunteer.core import records
from volunteer.core.manifest import loads
from volunteer.serving.backends import VolunteerServer, build_backends
from volunteer.serving.checkpoints import CheckpointStore
from volunteer.serving.served import ServedClock

MANIFEST = loads(grid_manifest("clocktest", [(1, 1)], d_model=16, max_batch_size=256, lr=0.01,
                                expert_types={"residual": ("residual_ffn", 32)}), fmt="toml")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_busy_time_counts_while_any_request_is_in_flight():
    clock = Clock()
    served = ServedClock(clock)
    served.begin()
    clock.now = 1.0
    served.begin()
    clock.now = 2.0
    served.end(5)
    assert served.reading() == (5, 2.0)  # one still in flight: counted up to now
    clock.now = 3.0
    served.end(0)
    clock.now = 10.0  # idle: not counted
    assert served.reading() == (5, 3.0)


def _serve_in_child(clock: ServedClock) -> None:
    clock.begin()
    clock.end(7)


def test_a_shared_clock_adds_up_what_forked_processes_served():
    clock = ServedClock.shared()
    children = [mp.get_context("fork").Process(target=_serve_in_child, args=(clock,)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
    assert [child.exitcode for child in children] == [0, 0]
    samples, busy = clock.reading()
    assert samples == 14 and busy >= 0


@pytest.mark.integration
def test_hiveminds_path_times_its_requests_in_the_handler_processes(tmp_path: Path):
    from hivemind.moe import get_experts

    from coordinator_seeds.dispatch import shutdown_dht

    uids = MANIFEST.all_uids()
    backends, _ = build_backends(MANIFEST, uids, 256, CheckpointStore(tmp_path), pools=True)
    dht = records.join_dht(MANIFEST.dht_prefix)
    server = VolunteerServer(dht, backends, [("cpu", uids)], num_connection_handlers=1, update_period=5)
    client = None
    try:
        server.run_in_background(await_ready=True, timeout=60)
        client = records.join_dht(MANIFEST.dht_prefix, [str(m) for m in dht.get_visible_maddrs()], client_mode=True)
        [expert] = wait_for(lambda: (lambda e: e if all(e) else None)(get_experts(client, uids)), 30, "experts")
        assert server.served() == [(0, 0.0)]
        for rows in (3, 5):
            x = torch.randn(rows, MANIFEST.d_model, requires_grad=True)
            expert(x).sum().backward()
        # the handler ends the clock from its future's callback, a moment after the answer may have left
        samples, busy = wait_for(lambda: server.served()[0] if server.served()[0][0] >= 8 else None, 10,
                                 "the backward samples on the clock")
        assert samples == 8 and busy > 0  # the backward calls' samples: what the trainer trained
    finally:
        server.shutdown()
        server.join(10)
        if client is not None:
            shutdown_dht(client)
