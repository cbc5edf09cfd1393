"""Kept forwards (``serving.activations``): the lean path computes each forward once, and a backward that
uses a kept graph gives exactly what hivemind's recompute gives. In-process, no peers: ~1 s."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import grid_manifest
from volunteer.core.manifest import loads
from volunteer.serving.activations import MAX_STALENESS, KeptForwards
from volunteer.serving.backends import _all_finite, build_backends, malformed
from volunteer.serving.checkpoints import CheckpointStore

MANIFEST = loads(grid_manifest("kepttest", [(1, 1), (1, 1)], d_model=16, max_batch_size=64, lr=0.01,
                                expert_types={"residual": ("residual_ffn", 32), "gated": ("swiglu_ffn", 24)}), fmt="toml")
D = MANIFEST.d_model


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _x(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def test_a_backward_finds_the_forward_of_the_same_bytes_once():
    kept = KeptForwards(64)
    x = _x(4)
    kept.keep([x], [x * 2], step=0)
    assert kept.take([x.clone()], since=1) is None  # too stale
    assert kept.take([_x(4, seed=1)], since=0) is None  # other samples
    assert kept.take([x[:3]], since=0) is None  # fewer samples
    found, rows = kept.take([x.clone()], since=0)
    assert rows == (0, 4) and torch.equal(found.outputs[0], x * 2)
    assert kept.take([x], since=0) is None  # matched once
    assert (kept.hits, kept.misses) == (1, 4)


def test_each_request_of_a_batched_forward_is_matched_to_its_rows():
    kept = KeptForwards(64)
    a, b = _x(2, 1), _x(3, 2)
    kept.keep([torch.cat([a, b])], [torch.cat([a, b])], step=0, parts=[(0, 2), (2, 5)])
    assert kept.take([torch.cat([a, b])], since=0) is None  # the whole batch was two requests
    assert kept.take([b], since=0)[1] == (2, 5)
    assert kept.take([a], since=0)[1] == (0, 2)


def test_bytes_decide_not_float_equality():
    kept = KeptForwards(64)
    zeros = torch.zeros(2, D)
    kept.keep([zeros], [zeros], step=0)
    assert kept.take([-zeros], since=0) is None  # -0.0 == 0.0 as floats, not as bytes
    assert kept.take([zeros.to(torch.float64)], since=0) is None


def test_the_store_holds_at_most_max_rows_and_drops_the_oldest_and_the_expired():
    clock = Clock()
    kept = KeptForwards(10, max_age=30, clock=clock)
    a, b, c = _x(4, 1), _x(4, 2), _x(4, 3)
    for x in (a, b, c):
        kept.keep([x], [x], step=0)
    assert kept.rows == 8 and len(kept) == 2  # a went to make room for c
    assert kept.take([a], since=0) is None and kept.take([b], since=0) is not None
    kept.clear()
    kept.keep([b], [b], step=0)
    kept.keep([_x(11)], [_x(11)], step=0)  # over the limit on its own: not kept, nothing dropped for it
    assert kept.rows == 4
    clock.now = 31.0
    kept.keep([a], [a], step=0)  # c expired meanwhile
    assert kept.take([c], since=0) is None and kept.rows == 4
    kept.clear()
    assert kept.rows == 0 and len(kept) == 0


@pytest.mark.parametrize("uid", MANIFEST.all_uids())
def test_a_kept_backward_equals_hiveminds_recompute_and_trains_the_same(tmp_path, uid):
    """The lean backend (kept graphs) and hivemind's (recompute) from the same weights: same outputs, same
    input gradients, same weights after the step; the lean one computed its forward once."""
    lean, _ = build_backends(MANIFEST, [uid], 64, CheckpointStore(tmp_path), pools=False)
    recompute, _ = build_backends(MANIFEST, [uid], 64, CheckpointStore(tmp_path / "other"), pools=False)
    lean, recompute = lean[uid], recompute[uid]
    recompute.kept = None  # as on hivemind's path: ModuleBackend's forward, and a backward that recomputes
    recompute.module.load_state_dict(copy.deepcopy(lean.module.state_dict()))
    x, grad = _x(5, 3), _x(5, 4)
    for step in range(3):
        [out_lean] = lean.forward(x)
        [out_recompute] = recompute.forward(x)
        assert not out_lean.requires_grad
        torch.testing.assert_close(out_lean, out_recompute, rtol=0, atol=0)
        [grad_lean] = lean.backward(x.clone(), grad)
        [grad_recompute] = recompute.backward(x.clone(), grad)
        torch.testing.assert_close(grad_lean, grad_recompute, rtol=1e-6, atol=1e-7)
    assert (lean.kept.hits, lean.kept.misses) == (3, 0) and len(lean.kept) == 0
    for mine, theirs in zip(lean.module.parameters(), recompute.module.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
    assert lean.counters.snapshot().optimizer_steps == 3


def test_callers_interleaved_get_the_gradient_of_the_weights_their_forward_used(tmp_path):
    """Two callers interleaved: the first one's backward steps the weights before the second one's
    backward. The second still uses its kept graph: the input gradient of the function it computed
    (its forward's weights), and its weight gradient is applied to today's weights, as a delayed
    gradient. Past ``MAX_STALENESS`` steps the graph is dropped and the backward recomputes."""
    [uid] = MANIFEST.all_uids()[:1]
    backends, _ = build_backends(MANIFEST, [uid], 64, CheckpointStore(tmp_path), pools=False)
    backend = backends[uid]
    a, b, grad = _x(3, 5), _x(3, 6), _x(3, 7)
    at_forward = copy.deepcopy(backend.module)
    backend.forward(a)
    backend.forward(b)
    backend.backward(a, grad)  # a step
    want = b.clone().requires_grad_(True)
    at_forward(want).backward(grad)
    weights_before = [p.detach().clone() for p in backend.module.parameters()]
    [got] = backend.backward(b, grad)
    torch.testing.assert_close(got, want.grad, rtol=1e-6, atol=1e-7)
    assert (backend.kept.hits, backend.kept.misses) == (2, 0)
    assert all(not torch.equal(p, q) for p, q in zip(backend.module.parameters(), weights_before))  # it trained
    backend.forward(b)
    for _ in range(MAX_STALENESS + 1):
        backend.backward(a, grad)  # misses (a's graph was used), and steps
    reference = copy.deepcopy(backend.module)
    [got] = backend.backward(b, grad)  # b's graph is too stale: recomputed on today's weights
    want = b.clone().requires_grad_(True)
    reference(want).backward(grad)
    torch.testing.assert_close(got, want.grad, rtol=1e-6, atol=1e-7)
    assert backend.kept.hits == 2 and len(backend.kept) == 0


def test_batched_requests_use_their_kept_graphs_and_recompute_only_the_rest(tmp_path):
    """The device worker batches requests: forwards of a, b, c in one batch, then d alone; the backward
    batch (c, d, e) finds c and d kept (a and b get zero gradients: not in this step), recomputes e, and
    gives what hivemind's recompute of (c, d, e) gives, weights included; a and b then use their graph."""
    [uid] = MANIFEST.all_uids()[:1]
    backends, _ = build_backends(MANIFEST, [uid], 64, CheckpointStore(tmp_path), pools=False)
    backend = backends[uid]
    reference = copy.deepcopy(backend.module)
    a, b, c, d, e = (_x(n, seed) for n, seed in ((2, 1), (3, 2), (4, 3), (1, 4), (2, 5)))
    backend.forward(torch.cat([a, b, c]), parts=[(0, 2), (2, 5), (5, 9)])
    backend.forward(d)
    grads = _x(7, 6)
    [got] = backend.backward(torch.cat([c, d, e]), grads, parts=[(0, 4), (4, 5), (5, 7)])
    assert (backend.kept.hits, backend.kept.misses) == (2, 1)
    assert len(backend.kept) == 1  # a and b still have theirs (one step stale now)
    want = torch.cat([c, d, e]).requires_grad_(True)
    optimizer = torch.optim.Adam(reference.parameters(), lr=MANIFEST.optimizer.lr)
    reference(want).backward(grads)
    optimizer.step()
    torch.testing.assert_close(got, want.grad, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(backend.module.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    backend.backward(torch.cat([b, a]), _x(5, 7), parts=[(0, 3), (3, 5)])
    assert (backend.kept.hits, backend.kept.misses) == (4, 1) and len(backend.kept) == 0


def test_the_memory_plan_counts_the_weight_copies_the_kept_graphs_hold():
    from volunteer.planning.memory import KEPT_WEIGHT_COPIES, expert_cost

    assert KEPT_WEIGHT_COPIES == MAX_STALENESS + 1
    expert_type = MANIFEST.expert_type("residual")
    lean, pools = (expert_cost(MANIFEST, expert_type, 64, "cpu", task_pools=p) for p in (False, True))
    assert lean.activations - pools.activations == KEPT_WEIGHT_COPIES * lean.weights


def test_the_finite_check_finds_nan_and_infinity_and_accepts_a_sum_that_overflows():
    big = torch.full((4, D), 3e38)
    assert _all_finite(big) and _all_finite(torch.full((4, D), 6e4, dtype=torch.float16))
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.ones(4, D, dtype=dtype)
        assert _all_finite(x)
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[2, 3] = bad
            assert not _all_finite(y), (dtype, bad)
    assert malformed([torch.tensor(np.full((2, D), np.nan, dtype=np.float32))],
                     [_schema()]) == "tensor 0 holds NaN or infinite values"


def _schema():
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    return BatchTensorDescriptor.from_tensor(torch.zeros(1, D))
