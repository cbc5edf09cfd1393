"""Commit, then reveal: what a server's answer commits to, and how a trainer checks a revealed version.

Every answer of an audited server carries, next to its tensor, the **commitment** of the expert's state
that produced it: the version number and the SHA-256 of that state (weights *and* optimizer state,
``state_digest``). A forward answer carries one (``FORWARD_COMMIT``: version, digest); a backward
answer two, the state it computed with and the state its optimizer step produced (``BACKWARD_COMMIT``).
The server keeps recent versions for a bounded time (``volunteer.serving.versions``). After an answer
came back, a trainer picks a few calls at random and asks for the version they committed to
(``Reveal``); it checks the revealed state against the digest, then recomputes:

- a forward call (``check_forward``): the expert on the revealed weights, on the inputs it sent,
  against the answer it got;
- a backward call (``check_backward``): from the revealed *before* state, the gradient w.r.t. the inputs
  it sent and the optimizer step on the batch the server says it trained on (which must contain the
  trainer's rows), against the gradient it got and the revealed *after* state. A frozen copy that never
  trains fails here: its after state is its before state, and the recomputed step moves the weights.

The server cannot tell an audited call from any other: the choice is made after the answer is back.
Tolerances are relative (``Tolerance``), measured CPU against CPU; a GPU's TF32 answers against the
trainer's CPU recomputation were not measured (no GPU was lent).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from volunteer.core.expert_modules import build_expert, build_optimizer

DIGEST_WORDS = 4  # a SHA-256 as four int64 words
FORWARD_COMMIT = 1 + DIGEST_WORDS  # [version, digest...] per answered row
BACKWARD_COMMIT = 2 * FORWARD_COMMIT  # [before version, before digest..., after version, after digest...]
MAX_REVEAL_BYTES = 64 * 2**20
REVEAL_RPC = "VolunteerAudit.rpc_reveal"  # request: uid, metadata = the version as text
AUDITED_FORWARD = "VolunteerAudit.rpc_forward"  # hivemind's ExpertRequest; the answer carries the commitment
AUDITED_BACKWARD = "VolunteerAudit.rpc_backward"


@dataclass(frozen=True)
class Commitment:
    version: int
    digest: tuple[int, ...]  # DIGEST_WORDS signed int64 words

    def row(self) -> list[int]:
        return [self.version, *self.digest]

    @staticmethod
    def of_row(row: torch.Tensor) -> Commitment:
        values = [int(v) for v in row.tolist()]
        return Commitment(values[0], tuple(values[1:FORWARD_COMMIT]))


def state_digest(module_state: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any] | None, *,
                 threads: int | None = None) -> tuple[int, ...]:
    """SHA-256 of an expert's weights and optimizer state, as ``DIGEST_WORDS`` int64 words.

    Canonical: tensors in name order, the optimizer's per-parameter state in index order (its
    hyperparameters too, so a changed learning rate is a different state). A server computes one at
    every optimizer step, before its answer can go out, so a large state is hashed on several cores:
    the state's bytes, each segment headed by its name, dtype, shape, offset and length
    (``_segments``), are cut into pieces of about ``DIGEST_PIECE`` bytes, each piece is hashed, and the
    digest is the SHA-256 of the pieces' digests in order. The pieces are fixed by the state alone, so
    the digest does not depend on how many threads computed it (``threads``: up to 4 by default, fewer on
    fewer cores); a small state is one piece."""
    pieces: list[list[tuple[bytes, memoryview | bytes]]] = [[]]
    size = filled = 0
    for segment in _segments(module_state, optimizer_state):
        if filled >= DIGEST_PIECE:
            pieces.append([])
            filled = 0
        pieces[-1].append(segment)
        filled += len(segment[1])
        size += len(segment[1])
    threads = _digest_threads() if threads is None else threads
    if size >= PARALLEL_DIGEST_FROM and threads > 1:
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="state-digest") as pool:
            digests = list(pool.map(_piece_digest, pieces))
    else:
        digests = [_piece_digest(piece) for piece in pieces]
    h = hashlib.sha256(b"".join(digests))
    if optimizer_state is not None:
        for i, group in enumerate(optimizer_state.get("param_groups", [])):
            h.update(repr(sorted((k, v) for k, v in group.items() if k != "params")).encode() + str(i).encode())
    raw = h.digest()
    return tuple(int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, 8 * DIGEST_WORDS, 8))


DIGEST_PIECE = 2**20  # bytes of state hashed as one piece (one thread's share)
PARALLEL_DIGEST_FROM = 8 * 2**20  # below this, a thread pool's hand-offs cost more than they save


def _segments(module_state: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any] | None
              ) -> Iterator[tuple[bytes, memoryview | bytes]]:
    """(header, bytes) of the state in canonical order, a tensor cut at ``DIGEST_PIECE``; views, no copies."""
    for name in sorted(module_state):
        yield from _tensor_segments(name, module_state[name])
    if optimizer_state is not None:
        for index in sorted(optimizer_state.get("state", {})):
            for name in sorted(optimizer_state["state"][index]):
                yield from _tensor_segments(f"{index}.{name}", optimizer_state["state"][index][name])


def _tensor_segments(name: str, value: Any) -> Iterator[tuple[bytes, memoryview | bytes]]:
    if not isinstance(value, torch.Tensor):
        yield _header(f"{name}\0{value!r}", 0), b""
        return
    tensor = value.detach().to("cpu").contiguous().reshape(-1)
    raw = tensor.view(torch.uint8).numpy() if tensor.numel() else b""
    label = f"{name}\0{tensor.dtype}\0{tuple(value.shape)}\0"
    for start in range(0, max(1, len(raw)), DIGEST_PIECE):
        data = memoryview(raw[start:start + DIGEST_PIECE])
        yield _header(f"{label}{start}", len(data)), data


def _header(label: str, length: int) -> bytes:
    """A segment's header, prefixed by its own length and naming the data's: no two states hash alike."""
    text = f"{label}\0{length}".encode()
    return len(text).to_bytes(4, "little") + text


def _piece_digest(piece: list[tuple[bytes, memoryview | bytes]]) -> bytes:
    h = hashlib.sha256()
    for header, data in piece:
        h.update(header)
        h.update(data)  # hashlib lets other threads run while it hashes more than 2 KiB
    return h.digest()


def _digest_threads() -> int:
    return min(4, os.cpu_count() or 1)


# --- what a server reveals -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reveal:
    """One version of an expert as its server kept it; for a version made by an optimizer step, the
    state before that step and the batch it trained on."""

    version: int
    module: dict[str, torch.Tensor]
    optimizer: dict | None
    parent: Reveal | None = None  # the state the step started from
    inputs: torch.Tensor | None = None  # the batch of that step (all tasks the server merged)
    grads: torch.Tensor | None = None

    def digest(self) -> tuple[int, ...]:
        return state_digest(self.module, self.optimizer)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self._to_dict(), buffer)
        return buffer.getvalue()

    def _to_dict(self) -> dict:
        return dict(version=self.version, module=self.module, optimizer=self.optimizer,
                    parent=self.parent._to_dict() if self.parent is not None else None,
                    inputs=self.inputs, grads=self.grads)

    @staticmethod
    def from_bytes(data: bytes) -> Reveal:
        if len(data) > MAX_REVEAL_BYTES:
            raise ValueError(f"a reveal of {len(data)} bytes is over the limit")
        return Reveal._from_dict(torch.load(io.BytesIO(data), weights_only=True))  # tensors, no code

    @staticmethod
    def _from_dict(d: Any) -> Reveal:
        if not isinstance(d, dict) or not isinstance(d.get("module"), dict):
            raise ValueError("not a reveal")
        parent = Reveal._from_dict(d["parent"]) if d.get("parent") is not None else None
        return Reveal(int(d["version"]), d["module"], d.get("optimizer"), parent, d.get("inputs"), d.get("grads"))


# --- the checks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How far an answer may be from the trainer's recomputation: max |diff| <= atol + rtol * max |ref|
    for outputs and gradients; for an optimizer step, the revealed update may differ from the recomputed
    one by ``update_rtol`` of the update's norm (a frozen copy's update is zero: a 100 % difference)."""

    rtol: float = 1e-3
    atol: float = 1e-5
    update_rtol: float = 0.05


@dataclass(frozen=True)
class ExpertSpec:
    """What a trainer needs to rebuild an expert: its block, sizes and optimizer (from the manifest)."""

    block: str
    d_model: int
    d_hidden: int
    optimizer: str
    lr: float


class AuditFailed(Exception):
    """The answer or the revealed state does not hold up; the message says which check failed."""


def check_forward(spec: ExpertSpec, commit: Commitment, reveal: Reveal, inputs: torch.Tensor, answer: torch.Tensor,
                  tolerance: Tolerance = Tolerance()) -> None:
    _check_commitment(commit, reveal, "forward")
    module = _module(spec, reveal)
    with torch.no_grad():
        expected = module(inputs.float())
    _close(answer, expected, tolerance, "forward output")


def check_backward(spec: ExpertSpec, before: Commitment, after: Commitment, reveal: Reveal, inputs: torch.Tensor,
                   grads: torch.Tensor, answer: torch.Tensor, tolerance: Tolerance = Tolerance()) -> None:
    """``reveal`` is the after version, with its parent and batch."""
    _check_commitment(after, reveal, "after")
    parent = reveal.parent
    if parent is None or reveal.inputs is None or reveal.grads is None:
        raise AuditFailed("the reveal of a trained version lacks its parent state or batch")
    _check_commitment(before, parent, "before")
    rows = _find_rows(reveal.inputs, reveal.grads, inputs, grads)
    module = _module(spec, parent)
    optimizer = build_optimizer(spec.optimizer, module.parameters(), lr=spec.lr)
    if parent.optimizer is not None:
        optimizer.load_state_dict(parent.optimizer)
    x = reveal.inputs.float().detach().requires_grad_(True)
    module(x).backward(reveal.grads.float())
    _close(answer, x.grad[rows], tolerance, "input gradient")
    before_weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    optimizer.step()
    expected = {k: v - before_weights[k] for k, v in module.state_dict().items()}
    revealed = {k: reveal.module[k].float() - parent.module[k].float() for k in expected}
    num = sum(float((revealed[k] - expected[k]).pow(2).sum()) for k in expected) ** 0.5
    den = sum(float(expected[k].pow(2).sum()) for k in expected) ** 0.5
    if not num <= tolerance.update_rtol * den + tolerance.atol:
        raise AuditFailed(f"the revealed optimizer step is off by {num / max(den, 1e-30):.1%} of the recomputed one")


def _check_commitment(commit: Commitment, reveal: Reveal, what: str) -> None:
    if reveal.version != commit.version:
        raise AuditFailed(f"{what}: version {reveal.version} revealed for {commit.version} committed")
    if reveal.digest() != commit.digest:
        raise AuditFailed(f"{what}: the revealed state of version {commit.version} is not the one committed")


def _module(spec: ExpertSpec, reveal: Reveal) -> torch.nn.Module:
    module = _built(spec)  # reused: an auditor checks one call at a time, and building costs more than loading
    try:
        module.load_state_dict(reveal.module)
    except (RuntimeError, KeyError) as e:
        raise AuditFailed(f"the revealed weights do not fit the expert: {str(e)[:120]}") from None
    module.zero_grad(set_to_none=True)  # a backward check left its gradients on the reused module
    return module.float()


@functools.lru_cache(maxsize=16)
def _built(spec: ExpertSpec) -> torch.nn.Module:
    return build_expert(spec.block, spec.d_model, spec.d_hidden)


def _find_rows(batch_x: torch.Tensor, batch_g: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> slice:
    """Where the trainer's own rows sit in the batch the server trained on (its pool may merge calls)."""
    n = len(x)
    if batch_x.dim() != 2 or batch_x.shape[1:] != x.shape[1:] or len(batch_x) < n or batch_g.shape != batch_x.shape:
        raise AuditFailed("the revealed batch does not have the call's shape")
    for start in range(len(batch_x) - n + 1):
        part = slice(start, start + n)
        if torch.equal(batch_x[part], x) and torch.equal(batch_g[part], g):
            return part
    raise AuditFailed("the revealed batch does not contain the call's inputs and gradients")


def _close(answer: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance, what: str) -> None:
    if answer.shape != expected.shape:
        raise AuditFailed(f"{what}: shape {tuple(answer.shape)}, recomputed {tuple(expected.shape)}")
    error = float((answer.float() - expected).abs().max()) if answer.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not error <= tolerance.atol + tolerance.rtol * scale:
        raise AuditFailed(f"{what} is off by {error:.3g} (scale {scale:.3g})")
