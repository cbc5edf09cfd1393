"""Strangers in the swarm (issue 14), with real server processes on 127.0.0.1: a hijacker of hivemind's
unsigned records gets no call, replicas of a uid all serve and fail over within the step, cheaters of
four kinds are caught by sampled audits, banned and not credited, while honest servers never are, and
a large grid is routed by beam search over the signed rows.

One swarm serves the whole module (``swarm``: eight server processes started at once, 30-85 s on two
shared cores), each test on its own layer or with its own trainer-side auditor, so no test waits for
a server process to start; only the replicas test kills one (its own layer's)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from hivemind import DHT
from hivemind.moe.client.expert import create_remote_experts
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from stranger_servers import D_MODEL, PREFIX, StrangerServer, running

from coordinator_seeds.audit import Auditor, AuditSettings, calls_to_catch
from coordinator_seeds.dispatch import BatchedRemoteMoE, shutdown_dht
from coordinator_seeds.replicas import (
    ReplicatedGridMoE,
    ReplicatedRemoteMoE,
    replicated_moe,
)
from coordinator_seeds.strangers import expert_specs
from volunteer.core.manifest import Manifest, MoELayer
from volunteer.core.records import join_dht, visible_maddrs

pytestmark = pytest.mark.integration

MANIFEST = Manifest.from_dict({
    "schema_version": 1, "name": "strangers-test", "dht_prefix": PREFIX, "d_model": D_MODEL,
    "max_batch_size": 4096, "optimizer": {"name": "adam", "lr": 1e-3},
    "expert_types": [{"name": "small", "block": "residual_ffn", "d_hidden": 32}],
    "layers": [{"uid_prefix": "tstrange_ffn0", "grid": [2, 5], "expert_type": "small"},  # cheaters + honest
               {"uid_prefix": "tstrange_rep", "grid": [1, 4], "expert_type": "small"},  # two replicas
               {"uid_prefix": "tstrange_big", "grid": [32, 16], "expert_type": "small"},  # > 256: beam search
               {"uid_prefix": "tstrange_f16", "grid": [1, 2], "expert_type": "small"}],  # float16 on the wire
    "trainer": {"seq_len": 16, "batch_size": 4, "k_best": 2, "lr": 1e-3},
})
LAYER, REPLICATED, BIG, F16 = MANIFEST.layers
UIDS, REP_UIDS, BIG_UIDS = LAYER.uids(), REPLICATED.uids(), ["tstrange_big.3.5", "tstrange_big.3.6", "tstrange_big.20.1"]
CHEATS = {"zeros": UIDS[2:4], "random": UIDS[4:6], "frozen": UIDS[6:8], "wrong1in10": UIDS[8:10]}
F16_MANIFEST = replace(MANIFEST, wire_dtype="float16")
AUDIT_RATE = 0.5  # high, so that the tests are short; the odds scale with it (calls_to_catch)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def peers() -> Iterator[list[str]]:
    bootstrap = join_dht(PREFIX)
    try:
        yield visible_maddrs(bootstrap)
    finally:
        bootstrap.shutdown()


@pytest.fixture(scope="module")
def swarm(peers: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, StrangerServer]]:
    keys = tmp_path_factory.mktemp("keys")
    servers = {
        "honest": StrangerServer(peers, UIDS[:2] + BIG_UIDS, "honest", keys / "honest.der"),
        **{kind: StrangerServer(peers, uids, kind, keys / f"{kind}.der") for kind, uids in CHEATS.items()},
        "hijacker": StrangerServer(peers, UIDS[:2] + BIG_UIDS[:1], "hijack", keys / "hijacker.der"),
        # declared rates 20 and 60 samples/s, below what either serves here, so the trainer's measurement
        # does not lower them; the slow one on hivemind's Server and TaskPools, the fast one lean
        "slow": StrangerServer(peers, REP_UIDS, "honest", keys / "slow.der", samples_per_second=20.0,
                               serving="hivemind"),
        "fast": StrangerServer(peers, REP_UIDS, "honest", keys / "fast.der", samples_per_second=60.0),
        "honest16": StrangerServer(peers, F16.uids(), "honest", keys / "honest16.der", wire_dtype="float16"),
    }
    with running(*servers.values()):
        yield servers


@pytest.fixture
def client(peers: list[str]) -> Iterator[DHT]:
    dht = join_dht(PREFIX, peers, client_mode=True)
    try:
        yield dht
    finally:
        shutdown_dht(dht)


def step(moe: BatchedRemoteMoE, tokens: int = 64) -> torch.Tensor:
    """One forward and backward through the layer, like a trainer step."""
    x = torch.randn(tokens, D_MODEL, requires_grad=True)
    moe(x).pow(2).mean().backward()
    return x


def layer(client: DHT, moe_layer: MoELayer = LAYER, auditor: Auditor | None = None, **kwargs) -> ReplicatedRemoteMoE:
    torch.manual_seed(0)
    return replicated_moe(D_MODEL, moe_layer, client, PREFIX, k_best=2, auditor=auditor, refresh_period=1.0,
                          evict_for=600.0, **kwargs)


def test_a_hijacker_of_unsigned_records_gets_no_call(swarm: dict[str, StrangerServer], client: DHT) -> None:
    honest, hijacker = swarm["honest"], swarm["hijacker"]
    plain = BatchedRemoteMoE(D_MODEL, LAYER, client, k_best=2)
    # the attack is live: hivemind's own records name the hijacker for the honest volunteer's uids
    wait_until(lambda: {str(e.peer_id) for i, e in plain.live.refresh().items() if i < 2} == {hijacker.peer_id},
               30, "hivemind's records to name the hijacker")
    signed = layer(client)
    wait_until(lambda: len(signed.live.refresh()) == 10, 30, "the ten signed uids to be found")
    for _ in range(10):
        step(signed)
    assert hijacker.peer_id not in signed.calls_by_peer and hijacker.peer_id not in signed.answered
    assert signed.answered[honest.peer_id][0] > 0 and signed.calls_failed == 0


HONEST_AUDITS = 1000


def test_honest_servers_are_never_flagged_over_a_thousand_audited_calls(swarm: dict[str, StrangerServer],
                                                                         client: DHT) -> None:
    """Every call audited (rate 1) until the honest server processes have passed 1,000 audits in all:
    the lean honest volunteer alone on the first two uids of the layer (a 1 x 2 layer over them: the
    cheaters' uids are not routed to), and the two replicas of ``REPLICATED``, one on hivemind's Server
    and TaskPools, one lean, sharing calls by rate. None is flagged; all are credited. (Before the
    replicas test, which kills one of them.)"""
    honest = (swarm["honest"], swarm["slow"], swarm["fast"])
    auditor = Auditor(expert_specs(MANIFEST), AuditSettings(rate=1.0, seed=3))
    lean_only = MoELayer(uid_prefix=LAYER.uid_prefix, grid=(1, 2), expert_type=LAYER.expert_type)
    try:
        layers = [layer(client, lean_only, auditor=auditor), layer(client, REPLICATED, auditor=auditor)]
        wait_until(lambda: len(layers[0].live.refresh()) == 2, 30, "the honest volunteer's two uids")
        wait_until(lambda: sum(map(len, layers[1].live.refresh().values())) == 8, 30, "both servers of four uids")
        for _ in range(400):  # ~14 audited calls a round; bounded in rounds, each wait bounded
            for moe in layers:
                step(moe, tokens=16)
            assert auditor.wait_idle(60.0), "audits still pending after 60 s"
            if sum(audited for audited, _ in auditor.verdicts().values()) >= HONEST_AUDITS:
                break
        verdicts = auditor.verdicts()
        assert sum(audited for audited, _ in verdicts.values()) >= HONEST_AUDITS, verdicts
        assert not auditor.failures and not auditor.banned() and auditor.skipped == 0, auditor.failures
        for server in honest:
            audited, passed = verdicts[server.peer_id]
            assert audited == passed >= 100 and auditor.credited(server.peer_id), (server.kind, audited, passed)
    finally:
        auditor.shutdown()


def test_replicas_share_calls_by_rate_and_fail_over_within_the_step(swarm: dict[str, StrangerServer],
                                                                    client: DHT) -> None:
    """Shares follow the throughputs the servers' records declare: within a factor 1.25 of 1:3."""
    slow, fast = swarm["slow"], swarm["fast"]
    for server in (slow, fast):  # a plain hivemind client gets the plain answer and trains the expert
        (expert,) = create_remote_experts([ExpertInfo(REP_UIDS[0], PeerID.from_base58(server.peer_id))], client)
        x = torch.randn(3, D_MODEL, requires_grad=True)
        output = expert(x)
        assert output.shape == x.shape
        output.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
    moe = layer(client, REPLICATED)
    wait_until(lambda: sum(map(len, moe.live.refresh().values())) == 8, 30, "both servers of the four uids")
    for _ in range(10):
        step(moe)
    shares = {peer: moe.answered[peer][0] for peer in (slow.peer_id, fast.peer_id)}
    assert 3 / 1.25 <= shares[fast.peer_id] / shares[slow.peer_id] <= 3 * 1.25, shares
    assert moe.failovers == 0
    before = dict(shares)
    fast.kill()
    step(moe)  # the killed server's calls fail in this step and go to the other one
    assert moe.failovers > 0
    assert moe.answered[slow.peer_id][0] - before[slow.peer_id] == 64 * 2  # every token answered
    assert moe.answered[fast.peer_id][0] == before[fast.peer_id]
    for _ in range(3):
        step(moe)
    assert moe.answered[slow.peer_id][0] - before[slow.peer_id] == 4 * 64 * 2


@pytest.mark.parametrize("kind, wrong_share", [("zeros", 1.0), ("random", 1.0), ("frozen", 1.0),
                                               ("wrong1in10", 0.1)])
def test_cheaters_are_caught_banned_and_not_credited(swarm: dict[str, StrangerServer], client: DHT, kind: str,
                                                     wrong_share: float) -> None:
    """Each cheater serves two uids next to the honest server's two (and the other cheaters'): caught
    within the calls the audit rate predicts (99.9 % odds), banned (no call after), no credit; the
    honest one never flagged. A frozen copy's forward answers are right: only its backward answers
    are wrong (their optimizer step does not move the weights), half of its calls."""
    honest, cheater = swarm["honest"], swarm[kind]
    auditor = Auditor(expert_specs(MANIFEST), AuditSettings(rate=AUDIT_RATE, seed=1))
    share = wrong_share / 2 if kind == "frozen" else wrong_share
    try:
        moe = layer(client, auditor=auditor)
        wait_until(lambda: len(moe.live.refresh()) == 10, 30, "the ten signed uids")
        budget = calls_to_catch(AUDIT_RATE, share, confidence=0.999)
        while cheater.peer_id not in auditor.banned() and moe.calls_by_peer.get(cheater.peer_id, 0) <= budget:
            step(moe)
            auditor.wait_idle()
        calls = moe.calls_by_peer.get(cheater.peer_id, 0)
        assert cheater.peer_id in auditor.banned(), f"not caught in {calls} calls (budget {budget})"
        mine = [line for line in auditor.failures if cheater.peer_id in line]
        assert kind != "frozen" or "optimizer step" in mine[0], mine
        for _ in range(3):
            step(moe)
        auditor.wait_idle()
        assert moe.calls_by_peer[cheater.peer_id] == calls  # banned: no call after the verdict
        assert honest.peer_id not in auditor.banned() and auditor.credited(honest.peer_id)
        assert not auditor.credited(cheater.peer_id)
    finally:
        auditor.shutdown()


def test_a_large_grid_is_routed_over_signed_rows_and_audited(swarm: dict[str, StrangerServer], client: DHT) -> None:
    """A 32 x 16 layer (512 uids, above the flat gate's 256) takes ``dispatch.GridRemoteMoE``'s beam search
    over the signed row records: only the honest server's three uids are live (the hijacker's hivemind
    record of one of them counts for nothing), every call goes to it, and its audited calls all pass."""
    honest, hijacker = swarm["honest"], swarm["hijacker"]
    auditor = Auditor(expert_specs(MANIFEST), AuditSettings(rate=1.0, seed=2))
    try:
        moe = layer(client, BIG, auditor=auditor)
        assert isinstance(moe, ReplicatedGridMoE)
        wait_until(lambda: set(moe.live.refresh()) == set(BIG_UIDS), 30, "the three signed uids of the grid")
        for _ in range(4):
            step(moe)
        auditor.wait_idle()
        assert set(moe.calls_by_peer) == {honest.peer_id} and hijacker.peer_id not in moe.answered
        assert moe.calls_failed == 0 and moe.last_live_count == 3
        audited, passed = auditor.verdicts()[honest.peer_id]
        assert audited == passed >= 8 and auditor.credited(honest.peer_id), auditor.failures
    finally:
        auditor.shutdown()


def test_rows_the_unsigned_grid_root_hides_are_still_found(swarm: dict[str, StrangerServer], client: DHT) -> None:
    """A stranger writes the grid's root record (hivemind's format, unsigned: anyone can) naming only
    row 7, where nobody serves, so a beam search that trusted it would never look at the honest
    server's rows 3 and 20. The trainer reads the rows the root does not name, 16 a refresh period
    in the background (``SignedGrid.first_coords``), and finds all three uids. (After the large-grid
    test: the record outlives this test.)"""
    honest = swarm["honest"]
    assert client.store(f"{BIG.uid_prefix}.", (f"{BIG.uid_prefix}.7.0", honest.peer_id), get_dht_time() + 600,
                        subkey=7)
    moe = layer(client, BIG)
    wait_until(lambda: moe.live.successors([moe.live.root])[moe.live.root].keys() == {7}, 30,
               "the forged root to be read")
    assert moe.live.first_coords() == [7]  # the attack is live: the root names no row the honest server has
    wait_until(lambda: set(moe.live.refresh()) == set(BIG_UIDS), 30, "the three signed uids behind the forged root")
    step(moe)
    assert set(moe.calls_by_peer) == {honest.peer_id} and moe.calls_failed == 0


def test_float16_on_the_wire_is_half_the_bytes_and_honest_answers_pass_their_audits(
        swarm: dict[str, StrangerServer], client: DHT) -> None:
    """A volunteer of an experiment with ``wire_dtype = "float16"`` declares hivemind's MEANSTD_16BIT in
    its schemas: a plain hivemind ``RemoteExpert`` follows them (forward and backward work), the server
    answers in 16 bits, and the trainer's layer sends 16 bits too. Every audited call of the honest
    server passes: the audit recomputes from the rounded inputs and gradients the server read (an audit
    keeping the float32 ones would not find them in the revealed batch) and allows the answer's rounding."""
    from hivemind.moe.client.expert import get_server_stub
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.proto import runtime_pb2
    from hivemind.utils import nested_flatten

    from coordinator_seeds.strangers import wire_tolerance
    from volunteer.core import wire

    server, float16 = swarm["honest16"], wire.compression("float16")
    (expert,) = create_remote_experts([ExpertInfo(F16.uids()[0], PeerID.from_base58(server.peer_id))], client)
    schemas = [*nested_flatten(expert.info["forward_schema"]), *nested_flatten(expert.info["outputs_schema"])]
    assert [s.compression for s in schemas] == [float16, float16]
    x = torch.randn(32, D_MODEL, requires_grad=True)
    expert(x).sum().backward()  # a plain client: inputs, outputs and gradients as the schemas say
    assert x.grad is not None and torch.isfinite(x.grad).all()
    request = runtime_pb2.ExpertRequest(uid=F16.uids()[0], tensors=[wire.serialize(x.detach(), float16)])
    answer = RemoteExpertWorker.run_coroutine(get_server_stub(expert.p2p, expert.peer_id).rpc_forward(request))
    (tensor,) = answer.tensors
    assert tensor.compression == float16 and len(tensor.buffer) == x.numel() * 2 + len(x) * 8  # + mean, std a row

    auditor = Auditor(expert_specs(MANIFEST), wire_tolerance(AuditSettings(rate=1.0, seed=3), F16_MANIFEST))
    try:
        moe = layer(client, F16, auditor=auditor)
        moe.wire = float16
        wait_until(lambda: len(moe.live.refresh()) == 2, 30, "the two float16 uids")
        for _ in range(3):
            step(moe)
        auditor.wait_idle()
        assert moe.calls_failed == 0 and set(moe.calls_by_peer) == {server.peer_id}
        audited, passed = auditor.verdicts()[server.peer_id]
        assert audited == passed >= 6 and auditor.credited(server.peer_id), auditor.failures
    finally:
        auditor.shutdown()


def test_the_seeds_ban_list_is_followed_and_anyone_elses_ignored(swarm: dict[str, StrangerServer], peers: list[str],
                                                                 client: DHT, tmp_path: Path) -> None:
    from coordinator_seeds.strangers import TrustedSwarm
    from volunteer.core.expert_records import publish_banned, read_banned
    from volunteer.core.records import (
        key_fingerprint,
        owner_subkey_of,
        record_key,
        use_record_key,
    )

    honest, banned = swarm["honest"], swarm["zeros"]
    seed_key, rogue_key = tmp_path / "seed.der", tmp_path / "rogue.der"
    for signer, peer in ((seed_key, banned.peer_id), (rogue_key, honest.peer_id)):
        use_record_key(signer)  # the DHT's validator signs with the key installed when it is built
        dht = join_dht(PREFIX, peers, client_mode=True)
        try:
            assert publish_banned(dht, PREFIX, [], [peer])
        finally:
            shutdown_dht(dht)
    use_record_key(tmp_path / "trainer.der")  # the trainer's own key: its own bans count too
    seed = key_fingerprint(owner_subkey_of(record_key(seed_key)))
    assert set(read_banned(client, PREFIX, {seed})) == {banned.peer_id}  # the rogue's list is not the seed's
    trust = TrustedSwarm(MANIFEST, client, None, trusted_ban_keys=(seed,))
    moe = trust.make_moe(D_MODEL, LAYER, client, 2, 10.0, 10.0, 4096)
    wait_until(lambda: len(moe.live.refresh()) == 8, 30, "the uids of everyone but the banned server")
    for _ in range(3):
        step(moe)
    assert honest.peer_id in moe.calls_by_peer and banned.peer_id not in moe.calls_by_peer
