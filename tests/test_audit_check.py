"""The audit's check at unit level: over 1,000 audited calls of an honest server, none flagged; each lie
the check is meant to catch, caught; the reading side of signed server records drops what nobody signed."""

from __future__ import annotations

import concurrent.futures
import math
import os
import sys
import threading
from typing import Iterator

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from coordinator_seeds.audit import (
    AUDIT_NICE,
    UNANSWERED_EXCLUSION,
    AuditedCall,
    Auditor,
    AuditSettings,
    _combined,
    calls_to_catch,
    reveal_seconds,
)
from coordinator_seeds.replicas import split_tokens
from volunteer.core.audit_check import (
    FORWARD_COMMIT,
    PARALLEL_DIGEST_FROM,
    AuditFailed,
    Commitment,
    ExpertSpec,
    Reveal,
    check_backward,
    check_forward,
    decode_reveal,
    encode_reveal,
    find_own_rows,
    rows_digest,
    state_digest,
)
from volunteer.core.expert_modules import build_expert, build_optimizer
from volunteer.core.expert_records import (
    AUDIT_PROTOCOL,
    group_key,
    parse_group,
    row_group_keys,
)
from volunteer.serving.batching import DeviceWorker, Task
from volunteer.serving.counters import ExpertCounters
from volunteer.serving.versions import AuditedBackend, VersionStore

SPEC = ExpertSpec("residual_ffn", 8, 16, "adam", 1e-3)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Experts this small run 7x faster on one thread than on a shared box's contended pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Expert:
    """An honest server's expert: forward and a training backward, committing like AuditedBackend."""

    def __init__(self, keep: int = 16):
        torch.manual_seed(0)
        self.module = build_expert(SPEC.block, SPEC.d_model, SPEC.d_hidden)
        self.optimizer = build_optimizer(SPEC.optimizer, self.module.parameters(), SPEC.lr)
        self.versions = VersionStore(keep=keep)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Commitment]:
        with torch.no_grad():
            return self.module(x), self.versions.current(self.module, self.optimizer)

    def backward(self, x: torch.Tensor, g: torch.Tensor, train: bool = True
                 ) -> tuple[torch.Tensor, Commitment, Commitment]:
        before = self.versions.current(self.module, self.optimizer)
        x = x.clone().requires_grad_(True)
        self.module(x).backward(g)
        if train:
            self.optimizer.step()
        self.optimizer.zero_grad()
        return x.grad, before, self.versions.advance(self.module, self.optimizer, before, x.detach(), g)

    def reveal(self, version: int, kind: str = "forward", own: tuple | None = None) -> Reveal:
        return through_the_wire(self.versions.reveal(version), kind, own)


def through_the_wire(kept: Reveal, kind: str, own: tuple[torch.Tensor, torch.Tensor] | None = None) -> Reveal:
    """What the trainer decodes of a kept version: opened for ``kind`` by the server, encoded, streamed in
    small parts and put back together, the trainer's own rows ``own`` left out and spliced back."""
    opened = kept.opened(kind)
    own_at = find_own_rows(opened.inputs, opened.grads, len(own[0]), rows_digest(*own)) \
        if own is not None and opened.inputs is not None else None
    header, tensors = encode_reveal(opened, own_at, len(own[0]) if own_at is not None else 0)
    parts = [part for tensor in tensors for part in split_for_streaming(tensor, 2**12)]
    return decode_reveal(header, _combined(parts), own)


def test_an_honest_lean_server_is_never_flagged_over_a_thousand_audited_calls() -> None:
    """The lean path's own pieces (``AuditedBackend`` on a ``DeviceWorker``, which may merge the two
    callers' tasks of a round into one batch) answer 1,000 audited calls, each checked; none flagged."""
    torch.manual_seed(0)
    module = build_expert(SPEC.block, SPEC.d_model, SPEC.d_hidden)
    backend = AuditedBackend("u.0", module, optimizer=build_optimizer(SPEC.optimizer, module.parameters(), SPEC.lr),
                             expert_type="small", counters=ExpertCounters("u.0", "small"),
                             args_schema=(BatchTensorDescriptor.from_tensor(torch.empty(1, SPEC.d_model)),),
                             min_batch_size=1, max_batch_size=256, pools=False)
    worker = DeviceWorker("cpu", {"u.0": backend})
    worker.start()

    def answers(kind: str, calls: list[list[torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
        futures = [concurrent.futures.Future() for _ in calls]
        for inputs, future in zip(calls, futures):
            worker.submit(Task("u.0", kind, inputs, deliver=lambda outcome, f=future: f.set_result(outcome)))
        return [future.result(timeout=30) for future in futures]

    def reveal(version: int, kind: str = "forward", own: tuple | None = None) -> Reveal:
        return through_the_wire(backend.reveal(version), kind, own)

    audited = 0
    try:
        for _ in range(250):
            xs = [torch.randn(int(torch.randint(1, 64, ())), SPEC.d_model) for _ in range(2)]
            for x, (output, rows) in zip(xs, answers("forward", [[x] for x in xs])):
                commit = Commitment.of_row(rows[0])
                check_forward(SPEC, commit, reveal(commit.version), x, output)
            gs = [torch.randn_like(x) * 10 ** float(torch.empty(()).uniform_(-4, 1)) for x in xs]  # every scale
            for x, g, (grad, rows) in zip(xs, gs, answers("backward", [[x, g] for x, g in zip(xs, gs)])):
                before, after = Commitment.of_row(rows[0, :FORWARD_COMMIT]), Commitment.of_row(rows[0, FORWARD_COMMIT:])
                check_backward(SPEC, before, after, reveal(after.version, "backward", (x, g)), x, g, grad)
            audited += 4
        # one forward, then another caller's step, then its backward: its kept graph is a version old, so
        # it is recomputed at the version the backward commits to, and the audit holds
        x1, x2 = torch.randn(8, SPEC.d_model), torch.randn(8, SPEC.d_model)
        answers("forward", [[x1]]), answers("forward", [[x2]])
        answers("backward", [[x1, torch.randn_like(x1)]])
        misses = backend.kept.misses
        g2 = torch.randn_like(x2)
        ((grad, rows),) = answers("backward", [[x2, g2]])
        before, after = Commitment.of_row(rows[0, :FORWARD_COMMIT]), Commitment.of_row(rows[0, FORWARD_COMMIT:])
        check_backward(SPEC, before, after, reveal(after.version, "backward", (x2, g2)), x2, g2, grad)
        assert backend.kept.misses == misses + 1
    finally:
        worker.stop()
        worker.join(10)
    assert audited >= 1000
    # the backwards ran on their forward's kept graph (no optimizer step between): audits hold there too
    assert backend.kept.hits >= 500, (backend.kept.hits, backend.kept.misses)


@pytest.mark.parametrize("lie", ["zeros", "random", "identity", "small noise", "other weights"])
def test_wrong_forward_answers_are_caught(lie: str) -> None:
    expert = Expert()
    x = torch.randn(32, SPEC.d_model)
    output, commit = expert.forward(x)
    answer = {"zeros": torch.zeros_like(output), "random": torch.randn_like(output) * output.std(),
              "identity": x, "small noise": output + 0.01 * output.std() * torch.randn_like(output),
              "other weights": build_expert(SPEC.block, SPEC.d_model, SPEC.d_hidden)(x).detach()}[lie]
    with pytest.raises(AuditFailed):
        check_forward(SPEC, commit, expert.reveal(commit.version), x, answer)


def test_a_frozen_copy_is_caught_at_its_backward_calls() -> None:
    expert = Expert()
    x, g = torch.randn(16, SPEC.d_model), torch.randn(16, SPEC.d_model)
    grad, before, after = expert.backward(x, g, train=False)
    with pytest.raises(AuditFailed, match="optimizer step"):
        check_backward(SPEC, before, after, expert.reveal(after.version, "backward", (x, g)), x, g, grad)


def test_a_reveal_that_is_not_the_committed_state_is_caught() -> None:
    expert = Expert()
    x = torch.randn(4, SPEC.d_model)
    output, commit = expert.forward(x)
    forged = expert.reveal(commit.version)
    forged.module["down.bias"] += 1e-6
    with pytest.raises(AuditFailed, match="not the one committed"):
        check_forward(SPEC, commit, forged, x, output)


def test_a_backward_step_on_a_batch_without_the_trainers_rows_is_caught() -> None:
    expert = Expert()
    x, g = torch.randn(16, SPEC.d_model), torch.randn(16, SPEC.d_model)
    grad, before, after = expert.backward(torch.randn_like(x), g)  # trained on other inputs
    with pytest.raises(AuditFailed, match="does not contain"):
        check_backward(SPEC, before, after, expert.reveal(after.version, "backward", (x, g)), x, g, grad)


def test_versions_are_kept_for_a_bounded_count() -> None:
    expert = Expert(keep=4)
    for _ in range(10):
        expert.backward(torch.randn(2, SPEC.d_model), torch.randn(2, SPEC.d_model))
    assert len(expert.versions) == 4
    assert expert.versions.reveal(3) is None and expert.versions.reveal(10) is not None
    assert expert.versions.reveal(7) is None  # the oldest kept version's parent is gone: not revealable
    params = sum(p.numel() for p in expert.module.parameters())
    assert expert.versions.memory_bytes() <= 4 * (3 * params * 4 + 2 * 2 * SPEC.d_model * 4 + 64)


def test_a_reveal_taken_before_its_buffer_is_reused_still_opens_its_commitment() -> None:
    """A version's buffer is reused once it expires; a reveal is a copy, so one still being encoded when
    the store moves on (a slow reveal stream, a busy box) still opens the commitment it was asked for."""
    expert = Expert(keep=2)
    _, before, after = expert.backward(torch.randn(2, SPEC.d_model), torch.randn(2, SPEC.d_model))
    kept = expert.versions.reveal(after.version)
    for _ in range(4):  # both buffers rewritten twice
        expert.backward(torch.randn(2, SPEC.d_model), torch.randn(2, SPEC.d_model))
    assert expert.versions.reveal(after.version) is None
    assert kept.digest() == after.digest and kept.parent.digest() == before.digest


class OddState(torch.nn.Module):
    """Tensors whose sizes leave alignment gaps in a version's buffer (a float16 buffer of 3 elements
    before float32 weights, an int64 after them)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 5)
        self.register_buffer("b16", torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16))
        self.register_buffer("count", torch.tensor(7, dtype=torch.int64))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_server_commits_to_the_digest_a_trainer_computes_of_the_revealed_state(optimizer: str) -> None:
    """The server hashes a flat copy of the state; the trainer hashes the revealed tensors one by one: the
    same bytes, the same digest, for a state of mixed dtypes (alignment gaps in the copy) and optimizer
    state that is not all tensors; and the revealed tensors are the live ones, value for value."""
    module = OddState()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3) if optimizer == "adam" else \
        torch.optim.SGD(module.parameters(), lr=1e-2, momentum=0.9)
    store = VersionStore(keep=3)
    commit = store.current(module, opt)
    for _ in range(4):
        module.a(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        if optimizer == "sgd":  # a plain value in the state, beside SGD's momentum buffers
            opt.state[module.a.weight]["calls"] = opt.state[module.a.weight].get("calls", 0) + 1
        commit = store.advance(module, opt, commit, torch.randn(4, 3), torch.randn(4, 3))
        assert commit.digest == state_digest(module.state_dict(), opt.state_dict())
        kept = store.reveal(commit.version)
        assert kept.digest() == commit.digest
        assert all(torch.equal(kept.module[k], v) for k, v in module.state_dict().items())
        live, revealed = opt.state_dict()["state"], kept.optimizer["state"]
        assert revealed.keys() == live.keys() and all(revealed[i].keys() == live[i].keys() for i in live)
        assert all(torch.equal(revealed[i][k], v) if isinstance(v, torch.Tensor) else revealed[i][k] == v
                   for i in live for k, v in live[i].items())


def test_a_version_current_for_longer_than_the_keeping_time_is_still_revealed_after_its_step() -> None:
    """Version 0 answered for 100 s (an idle expert), then one step: the step's reveal needs version 0 as
    its parent, whose 60 s start when it stopped being current. (CI caught an honest server banned for
    "version 1 was not kept" when its age counted from the snapshot.)"""
    now = [0.0]
    expert = Expert()
    expert.versions = VersionStore(keep=16, keep_for=60.0, clock=lambda: now[0])
    expert.forward(torch.randn(2, SPEC.d_model))
    now[0] = 100.0
    _, before, after = expert.backward(torch.randn(2, SPEC.d_model), torch.randn(2, SPEC.d_model))
    assert (before.version, after.version) == (0, 1) and expert.versions.reveal(1) is not None
    now[0] = 159.0
    assert expert.versions.reveal(1) is not None and expert.versions.reveal(0) is not None
    now[0] = 161.0  # 61 s after version 0 was superseded: gone; the current one always stays
    assert expert.versions.reveal(0) is None and expert.versions.reveal(1) is None and len(expert.versions) == 1


def test_the_state_digest_binds_every_byte_and_name_on_any_number_of_threads() -> None:
    """A state above ``PARALLEL_DIGEST_FROM`` is hashed on BLAKE3's threads: the digest is the same on
    one thread, and moves with a flipped last byte, bytes moved from one tensor to the next, a renamed
    tensor or a changed learning rate. (~0.1 s: 6 digests of 9 MiB.)"""
    x = torch.randn((PARALLEL_DIGEST_FROM + 2**20) // 4)
    cut = len(x) // 3
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": x[:8]}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    digest = state_digest({"a": x[:cut], "b": x[cut:]}, optimizer, threads=4)
    assert digest == state_digest({"a": x[:cut], "b": x[cut:]}, optimizer, threads=1)
    flipped = x.clone()
    flipped.view(torch.uint8)[-1] ^= 1
    assert state_digest({"a": flipped[:cut], "b": flipped[cut:]}, optimizer) != digest
    assert state_digest({"a": x[:cut + 1], "b": x[cut + 1:]}, optimizer) != digest
    assert state_digest({"a": x[:cut], "c": x[cut:]}, optimizer) != digest
    assert state_digest({"a": x[:cut], "b": x[cut:]}, {**optimizer, "param_groups": [{"lr": 2e-3, "params": [0]}]}) != digest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own priority is Linux's")
def test_the_audits_recompute_at_the_lowest_cpu_priority() -> None:
    auditor = Auditor({"u.0": SPEC}, AuditSettings(rate=1.0))
    try:
        niceness = auditor._pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        assert niceness.result(timeout=10) == AUDIT_NICE
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < AUDIT_NICE  # this thread's own stays
    finally:
        auditor.shutdown()


def test_odds_of_catching() -> None:
    """The README's figures ("Odds"): n with 1 - (1 - r*p)^n >= confidence, at r = 2 %."""
    assert calls_to_catch(0.02, 1.0) == 149 and calls_to_catch(0.02, 1.0, confidence=0.999) == 342
    assert calls_to_catch(0.02, 0.5) == 299
    assert calls_to_catch(0.02, 0.1) == 1497 and calls_to_catch(0.02, 0.1, confidence=0.999) == 3451
    assert calls_to_catch(0.02, 0.01) == 14978
    assert 149_000 < calls_to_catch(0.02, 0.001) < 151_000
    for p in (1.0, 0.5, 0.1, 0.01):  # the least such n: one call fewer falls short
        n = calls_to_catch(0.02, p)
        assert 1 - (1 - 0.02 * p) ** n >= 0.95 > 1 - (1 - 0.02 * p) ** (n - 1)
    assert calls_to_catch(0.0, 1.0) == math.inf


@pytest.mark.parametrize("n, rates, expected", [(64, [20.0, 60.0], [16, 48]), (7, [1.0, 1.0, 1.0], [3, 2, 2]),
                                                (0, [1.0], [0]), (5, [0.0, 0.0], [3, 2])])
def test_tokens_are_split_by_rate(n: int, rates: list[float], expected: list[int]) -> None:
    assert split_tokens(n, rates) == expected


def test_only_signed_well_formed_records_of_the_group_are_read() -> None:
    key = group_key("p", "u.3.5")
    assert key == "p_servers.u.3.0" and group_key("p", "u.3.70") == "p_servers.u.3.1" == row_group_keys("p", "u.3.", 70)[1]
    good = dict(peer_id="QmA", device="cpu", reachable=True, paused=False, audit=1, uids={"u.3.5": 10.0})
    items = [
        (b"[owner:AAAA]", good),
        (b"anyone", good),  # no owner: anybody may have written it
        (b"[owner:BBBB]", {**good, "uids": {"u.3.5": -1.0}}),
        (b"[owner:CCCC]", {**good, "paused": True}),
        (b"[owner:DDDD]", "not a record"),
        (b"[owner:EEEE]", {**good, "uids": {"u.3.70": 1.0, "u.4.5": 1.0}}),  # uids of other groups
        (b"[owner:FFFF]", {**good, "uids": {f"u.3.{i}": 1.0 for i in range(65)}}),  # more than a group holds
    ]
    found = parse_group(key, items)
    assert [(r.owner, r.uid, r.samples_per_second) for r in found] == [(b"[owner:AAAA]", "u.3.5", 10.0)]
    assert parse_group(key, items, banned={found[0].key}) == []
    assert parse_group(key, items, banned={"QmA"}) == []
    assert [r.owner for r in parse_group(key, items, include_paused=True)] == [b"[owner:AAAA]", b"[owner:CCCC]"]
    # a trainer reads only servers of its own audit protocol: another one's digests never match
    assert [r.owner for r in parse_group(key, items, audit=1)] == [b"[owner:AAAA]"]
    assert parse_group(key, items, audit=AUDIT_PROTOCOL) == []
    ours = [(b"[owner:AAAA]", {**good, "audit": AUDIT_PROTOCOL})]
    assert [r.audit for r in parse_group(key, ours, audit=AUDIT_PROTOCOL)] == [AUDIT_PROTOCOL]


def test_an_unanswered_reveal_excludes_for_a_doubling_while_and_is_never_a_published_ban() -> None:
    """A reveal that does not come (a home uplink down looks the same as a cheater hanging up): no credit
    for the run and no calls for 30 s, then 60 s at the next in a row; no key is banned for good."""
    now = [1000.0]

    def hang_up(call: AuditedCall, seconds_for) -> Reveal:
        raise ConnectionError("connection reset")

    auditor = Auditor({"u.0": SPEC}, AuditSettings(rate=1.0, seed=1), reveal=hang_up)
    auditor.clock = lambda: now[0]
    x = torch.randn(4, SPEC.d_model)
    call = AuditedCall("u.0", "QmPeer", "key1", None, "forward", x, x, (Commitment(3, (0, 0, 0, 0)),))
    try:
        for excluded_for in (UNANSWERED_EXCLUSION, 2 * UNANSWERED_EXCLUSION):
            assert auditor.sample(lambda: call)
            assert auditor.wait_idle(10)
            assert "QmPeer" in auditor.banned() and not auditor.credited("QmPeer")
            assert auditor.failed() == (frozenset(), frozenset()), "unanswered is not a published ban"
            now[0] += excluded_for - 1
            assert "QmPeer" in auditor.banned()
            now[0] += 2
            assert "QmPeer" not in auditor.banned(), "the exclusion ends"
        # reveals that were in flight together (one outage fails them all) count as one strike: the third
        # exclusion is 120 s, whatever fails while it lasts
        for _ in range(3):
            assert auditor.sample(lambda: call)
        assert auditor.wait_idle(10)
        now[0] += 4 * UNANSWERED_EXCLUSION - 1
        assert "QmPeer" in auditor.banned()
        now[0] += 2
        assert "QmPeer" not in auditor.banned(), "strikes in flight together were counted one by one"
    finally:
        auditor.shutdown()


def test_a_frozen_copy_that_claims_a_learning_rate_of_zero_is_caught() -> None:
    """Its empty step would be the right one at lr 0: the revealed hyperparameters must be the experiment's."""
    expert = Expert()
    for group in expert.optimizer.param_groups:
        group["lr"] = 0.0
    x, g = torch.randn(16, SPEC.d_model), torch.randn(16, SPEC.d_model)
    grad, before, after = expert.backward(x, g)
    with pytest.raises(AuditFailed, match="hyperparameters"):
        check_backward(SPEC, before, after, expert.reveal(after.version, "backward", (x, g)), x, g, grad)


def test_a_reveal_carries_only_what_its_audit_needs() -> None:
    """Forward: the weights and the optimizer state's digest. Backward: the before state in full, the after
    weights, and none of the trainer's own rows; each still checks against the commitment."""
    expert = Expert()
    weights = sum(p.numel() * 4 for p in expert.module.parameters())
    x, g = torch.randn(16, SPEC.d_model), torch.randn(16, SPEC.d_model)
    expert.backward(torch.randn_like(x), torch.randn_like(g))  # the before state then has Adam's moments
    grad, before, after = expert.backward(x, g)
    kept = expert.versions.reveal(after.version)
    optimizer = sum(v.numel() * v.element_size() for s in kept.parent.optimizer["state"].values() for v in s.values())
    forward = encode_reveal(kept.opened("forward"))
    assert MSGPackSerializer.loads(forward[0])["bytes"] == weights
    own_at = find_own_rows(kept.inputs, kept.grads, len(x), rows_digest(x, g))
    assert own_at == 0
    backward = encode_reveal(kept.opened("backward"), own_at, len(x))
    assert MSGPackSerializer.loads(backward[0])["bytes"] == 2 * weights + optimizer
    old = 2 * (weights + optimizer) + 2 * x.numel() * 4  # two full states and the whole batch, as before
    print(f"reveal bytes of a {SPEC.block} {SPEC.d_model}/{SPEC.d_hidden} expert: forward {weights} "
          f"(was {weights + optimizer}), backward {2 * weights + optimizer} (was {old})")
    check_backward(SPEC, before, after, expert.reveal(after.version, "backward", (x, g)), x, g, grad)
    # a batch the server merged with another caller's rows: only the others' rows are sent
    xo, go = torch.randn(3, SPEC.d_model), torch.randn(3, SPEC.d_model)
    grad, before, after = expert.backward(torch.cat([xo, x]), torch.cat([go, g]))
    revealed = expert.reveal(after.version, "backward", (x, g))
    assert torch.equal(revealed.inputs, torch.cat([xo, x])) and torch.equal(revealed.grads, torch.cat([go, g]))
    check_backward(SPEC, before, after, revealed, x, g, grad[3:])


def _encoded(kind: str = "backward") -> tuple[dict, list]:
    expert = Expert()
    x, g = torch.randn(4, SPEC.d_model), torch.randn(4, SPEC.d_model)
    _, _, after = expert.backward(x, g)
    header, tensors = encode_reveal(expert.versions.reveal(after.version).opened(kind))
    return MSGPackSerializer.loads(header), tensors


def _compressed(tensors: list) -> list:
    from hivemind.proto import runtime_pb2

    return [serialize_torch_tensor(deserialize_torch_tensor(tensors[0]), runtime_pb2.CompressionType.FLOAT16),
            *tensors[1:]]


MALFORMED = [  # id, change of (header, tensors)
    ("one-tensor-missing", lambda h, t: (h, t[:-1])),
    ("one-tensor-more", lambda h, t: (h, t + t[:1])),
    ("bytes-announced-differ", lambda h, t: ({**h, "bytes": h["bytes"] + 4}, t)),
    ("a-compressed-tensor", lambda h, t: ({**h, "bytes": h["bytes"] - len(t[0].buffer) + len(_compressed(t)[0].buffer)},
                                          _compressed(t))),
    ("a-parent-of-a-parent", lambda h, t: ({**h, "parent": {**h["parent"], "parent": h["parent"]}}, t)),
    ("version-not-an-int", lambda h, t: ({**h, "version": "7"}, t)),
    ("weight-names-repeated", lambda h, t: ({**h, "weights": h["weights"][:1] * len(h["weights"])}, t)),
    ("optimizer-and-its-digest", lambda h, t: ({**h, "optimizer_digest": b"x" * 32,
                                                "parent": {**h["parent"], "optimizer_digest": b"x" * 32}}, t)),
    ("rows-to-splice-without-own", lambda h, t: ({**h, "batch": {"own_at": 0}}, t)),
    ("not-a-dict", lambda h, t: ([1, 2, 3], t)),
]


@pytest.mark.parametrize("change", [pytest.param(c, id=i) for i, c in MALFORMED])
def test_a_malformed_reveal_is_refused_in_one_line(change) -> None:
    header, tensors = change(*_encoded())
    with pytest.raises(ValueError, match="reveal"):
        decode_reveal(MSGPackSerializer.dumps(header), tensors)
    with pytest.raises(ValueError, match="msgpack"):
        decode_reveal(b"\xc1 not msgpack", tensors)


def test_a_reveal_has_time_for_its_bytes_at_the_measured_rate() -> None:
    settings = AuditSettings()
    assert reveal_seconds(0, 1e6, settings) == settings.reveal_floor
    two_mb = reveal_seconds(2 * 10**6, 10**6, settings)
    assert two_mb == settings.reveal_floor + settings.reveal_slack * 2
    assert reveal_seconds(4 * 10**6, 10**6, settings) > two_mb > reveal_seconds(2 * 10**6, 10**7, settings)
    assert reveal_seconds(10**12, 1.0, settings) == settings.reveal_ceiling


@pytest.mark.parametrize("announced, sent, refused", [(100, 100, False), (100, 101, True), (2**40, 10, True)])
def test_a_reveal_message_longer_than_announced_is_refused_before_it_is_read(announced, sent, refused) -> None:
    """The stream's framing is hivemind's; the length a peer announces is checked before any byte is read."""
    import asyncio

    from hivemind.p2p import P2P
    from hivemind.proto import runtime_pb2

    from coordinator_seeds.audit import read_bounded

    message = runtime_pb2.ExpertResponse(metadata=b"m" * 90).SerializeToString()

    async def read() -> object:
        reader = asyncio.StreamReader()
        length = announced if announced > 2**20 else len(message) + sent - 100
        reader.feed_data(P2P.MESSAGE_MARKER + length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + message + b"\0" * 8)
        reader.feed_eof()
        return await read_bounded(reader, len(message))

    if refused:
        with pytest.raises(ValueError, match="over what was announced"):
            asyncio.run(read())
    else:
        assert asyncio.run(read()).metadata == b"m" * 90
