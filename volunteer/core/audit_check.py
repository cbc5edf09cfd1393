"""Commit, then reveal: what a server's answer commits to, and how a trainer checks a revealed version.

Every answer of an audited server carries, next to its tensor, the **commitment** of the expert's state
that produced it: the version number and the digest of that state (``state_digest``: a two-leaf tree,
the BLAKE3 of the weights and the BLAKE3 of the optimizer state, hashed together). A forward answer
carries one (``FORWARD_COMMIT``: version, digest); a backward answer two, the state it computed with and
the state its optimizer step produced (``BACKWARD_COMMIT``). The server keeps recent versions for a
bounded time (``volunteer.serving.versions``). After an answer came back, a trainer picks a few calls at
random and asks for the version they committed to (``Reveal``); it checks the revealed state against the
digest, then recomputes:

- a forward call (``check_forward``): the expert on the revealed weights, on the inputs it sent,
  against the answer it got;
- a backward call (``check_backward``): from the revealed *before* state, the gradient w.r.t. the inputs
  it sent and the optimizer step on the batch the server says it trained on (which must contain the
  trainer's rows), against the gradient it got and the revealed *after* weights. A frozen copy that never
  trains fails here: its after weights are its before weights, and the recomputed step moves them. The
  optimizer's hyperparameters must be the experiment's (a state claiming ``lr = 0`` would otherwise make
  a frozen copy's empty step the right one).

**What a reveal carries, and why each part** (``opened``; ``RevealRequest`` says which kind):

- forward: the weights of the version (the recomputation runs on them) and only the *digest* of its
  optimizer state (the commitment covers it, the forward never reads it): a third of the bytes with Adam;
- backward, *before* state: weights and optimizer state in full, since the step is recomputed from both
  (Adam's moments decide the update as much as the gradient does);
- backward, the step's batch: only the rows the trainer did not send. The server may have merged other
  callers' rows into the step and the recomputation needs all of them, but the trainer's own inputs and
  gradients are spliced back in where the server says (``own_at``): sending them back proves nothing the
  splice does not;
- backward, *after* state: the weights (the recomputed update is compared with theirs) and the digest of
  the optimizer state, which nothing recomputes bit for bit (a GPU's or another thread count's step
  differs in the last bits, so the after state is checked within a tolerance, not by its digest).

For the lab's expert (residual_ffn 256/256 with Adam, calls of 512 tokens) a backward reveal went from
two full states and the whole batch (4.2 MB, more than the p2p daemon's unary message limit) to 2.1 MB,
and a forward reveal from 1.6 to 0.5 MB.

**On the wire** (``encode_reveal``/``decode_reveal``): the structure (names, version numbers, optimizer
hyperparameters, where the trainer's rows go) is msgpack (hivemind's ``MSGPackSerializer``), each tensor
hivemind's ``serialize_torch_tensor`` with no compression, so the digest sees the server's exact bytes.
Nothing received is unpickled. The server streams it (``volunteer.serving.versions.RevealService``).

The server cannot tell an audited call from any other: the choice is made after the answer is back.
Tolerances are relative (``Tolerance``), measured CPU against CPU; a GPU's TF32 answers against the
trainer's CPU recomputation were not measured (no GPU was lent).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import blake3
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from volunteer.core.expert_modules import build_expert, build_optimizer

DIGEST_WORDS = 4  # a 256-bit digest as four int64 words
FORWARD_COMMIT = 1 + DIGEST_WORDS  # [version, digest...] per answered row
BACKWARD_COMMIT = 2 * FORWARD_COMMIT  # [before version, before digest..., after version, after digest...]
MAX_REVEAL_BYTES = 64 * 2**20  # what a trainer receives of one reveal at most, structure and tensors
MAX_HEADER_BYTES = 2**20  # the msgpack structure of a reveal
REVEAL_RPC = "VolunteerAudit.rpc_reveal"  # request: uid, metadata = RevealRequest; answer: a stream
AUDITED_FORWARD = "VolunteerAudit.rpc_forward"  # hivemind's ExpertRequest; the answer carries the commitment
AUDITED_BACKWARD = "VolunteerAudit.rpc_backward"
AUDITED_FORWARD_STREAM = "VolunteerAudit.rpc_forward_stream"  # the same, streamed, above the unary size
AUDITED_BACKWARD_STREAM = "VolunteerAudit.rpc_backward_stream"
NONE = runtime_pb2.CompressionType.NONE
# optimizer settings that say how torch runs the step, not what it computes: not compared with the manifest
_HOW_IT_RUNS = frozenset({"params", "foreach", "fused", "capturable", "differentiable"})


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
    """The commitment's digest of an expert's weights and optimizer state, as ``DIGEST_WORDS`` int64 words:
    a tree of two leaves, the weights' digest and the optimizer state's, so a reveal can open the weights
    and show only the optimizer state's digest (``Reveal.opened``).

    Each leaf is BLAKE3 over a canonical stream (``weights_leaf``, ``optimizer_leaf``): a header naming
    every entry in order (name, dtype and shape of a tensor; the value of anything else; the optimizer's
    hyperparameters, so a changed learning rate is a different state), then the tensors' bytes in that
    order. A server hashes that stream at every optimizer step, before its answer can go out: it copies
    the tensors into one flat buffer in this order (``serving.versions``) and hashes the buffer in one
    call; a trainer hashes the revealed tensors one after the other; the bytes, so the digests, are the
    same. BLAKE3 rather than SHA-256: as sound (256 bits, a standard design), 3x faster on one core here
    (0.07 against 0.22 ms for the 0.4 MB of a 64/256 expert with Adam, with the CPU's SHA extensions),
    and its tree makes the same digest on any number of threads (``threads``: BLAKE3's own pool from
    ``PARALLEL_DIGEST_FROM`` bytes by default, one thread below)."""
    return combined_digest(weights_digest(module_state, threads=threads),
                           optimizer_digest(optimizer_state, threads=threads))


def weights_digest(module_state: Mapping[str, torch.Tensor], *, threads: int | None = None) -> bytes:
    """The weights' leaf."""
    header, entries = weights_leaf(module_state)
    return leaf_digest(header, [_bytes_of(t) for _, t in entries], threads)


def optimizer_digest(optimizer_state: Mapping[str, Any] | None, *, threads: int | None = None) -> bytes:
    """The optimizer state's leaf."""
    if optimizer_state is None:
        return NO_OPTIMIZER_DIGEST
    header, entries = optimizer_leaf(optimizer_state)
    return leaf_digest(header, [_bytes_of(t) for _, t in entries], threads)


def weights_leaf(module_state: Mapping[str, Any]) -> tuple[bytes, list[tuple[str, torch.Tensor]]]:
    """A leaf's header and its tensors in stream order: the weights in name order."""
    labels, tensors = [], []
    for name in sorted(module_state):
        labels.append(_label(name, module_state[name], tensors, name))
    return b"".join(labels), tensors


def optimizer_leaf(optimizer_state: Mapping[str, Any]) -> tuple[bytes, list[tuple[tuple[int, str], torch.Tensor]]]:
    """The optimizer's per-parameter state in index then name order, then its hyperparameters."""
    labels, tensors = [], []
    state = optimizer_state.get("state", {})
    for index in sorted(state):
        for name in sorted(state[index]):
            labels.append(_label(f"{index}.{name}", state[index][name], tensors, (index, name)))
    for i, group in enumerate(optimizer_state.get("param_groups", [])):
        labels.append(_framed(f"group {i}\0{sorted((k, v) for k, v in group.items() if k != 'params')!r}"))
    return b"".join(labels), tensors


def leaf_digest(header: bytes, data: Sequence[Any], threads: int | None, size: int | None = None) -> bytes:
    """BLAKE3 of the header (prefixed by its length: it ends where the tensors' bytes start) and of
    ``data``, buffers in stream order; ``size``, their bytes if known (it decides the threads)."""
    if size is None:
        size = sum(len(d) for d in data)
    if threads is None:
        threads = blake3.blake3.AUTO if size >= PARALLEL_DIGEST_FROM else 1
    h = blake3.blake3(len(header).to_bytes(8, "little") + header, max_threads=threads)
    for d in data:
        h.update(d)
    return h.digest()


def combined_digest(weights: bytes, optimizer: bytes) -> tuple[int, ...]:
    raw = blake3.blake3(b"weights\0" + weights + b"optimizer\0" + optimizer).digest()
    return tuple(int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, 8 * DIGEST_WORDS, 8))


PARALLEL_DIGEST_FROM = 8 * 2**20  # below this, a thread pool's hand-offs cost more than they save
NO_OPTIMIZER_DIGEST = blake3.blake3(b"no optimizer").digest()


def _label(name: str, value: Any, tensors: list, key: Any) -> bytes:
    """An entry's part of the header; a tensor is appended to ``tensors`` (its bytes follow the header)."""
    if isinstance(value, torch.Tensor):
        tensors.append((key, value))
        return _framed(f"{name}\0{value.dtype}\0{tuple(value.shape)}")
    return _framed(f"{name}\0={value!r}")


def _framed(text: str) -> bytes:
    """Prefixed by its own length: no two headers read alike."""
    data = text.encode()
    return len(data).to_bytes(4, "little") + data


def _bytes_of(tensor: torch.Tensor) -> Any:
    """A tensor's bytes as a buffer, row-major, without copying a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


# --- what a server reveals -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reveal:
    """One version of an expert as its server kept it; for a version made by an optimizer step, the
    state before that step and the batch it trained on. ``optimizer_digest`` stands for an optimizer
    state that is not sent (``optimizer`` is then None)."""

    version: int
    module: dict[str, torch.Tensor]
    optimizer: dict | None
    parent: Reveal | None = None  # the state the step started from
    inputs: torch.Tensor | None = None  # the batch of that step (all tasks the server merged)
    grads: torch.Tensor | None = None
    optimizer_digest: bytes | None = None
    wire_bytes: int = 0  # the tensor bytes it came in (``decode_reveal``); 0 if it did not cross a wire

    def digest(self) -> tuple[int, ...]:
        opt = self.optimizer_digest if self.optimizer_digest is not None else optimizer_digest(self.optimizer)
        return combined_digest(weights_digest(self.module), opt)

    def opened(self, kind: str) -> Reveal:
        """What a ``kind`` ("forward"/"backward") audit needs of this version (the module docstring says why)."""
        shown = replace(self, optimizer=None, optimizer_digest=optimizer_digest(self.optimizer), parent=None,
                        inputs=None, grads=None)
        if kind != "backward" or self.parent is None:
            return shown
        return replace(shown, parent=replace(self.parent, parent=None, inputs=None, grads=None),
                       inputs=self.inputs, grads=self.grads)


@dataclass(frozen=True)
class RevealRequest:
    """What a trainer asks for: a version, for which kind of audit, and for a backward one the call's
    rows (their count and SHA-256), so the server can leave them out of the batch it sends back."""

    version: int
    kind: str = "forward"
    rows: int = 0
    rows_digest: bytes = b""

    def to_bytes(self) -> bytes:
        return MSGPackSerializer.dumps([self.version, self.kind, self.rows, self.rows_digest])

    @staticmethod
    def from_bytes(data: bytes) -> RevealRequest:
        """Raises ValueError on anything but the four fields of their types."""
        try:
            version, kind, rows, digest = MSGPackSerializer.loads(data)
        except Exception as e:
            raise ValueError(f"not a reveal request: {type(e).__name__}") from None
        if not (type(version) is int and kind in ("forward", "backward") and type(rows) is int and rows >= 0
                and isinstance(digest, bytes) and len(digest) in (0, 32)):
            raise ValueError("not a reveal request")
        return RevealRequest(version, kind, rows, digest)


def rows_digest(inputs: torch.Tensor, grads: torch.Tensor) -> bytes:
    """SHA-256 of a call's rows, inputs and gradients, as the server kept them (fp32, row-major)."""
    h = hashlib.sha256()
    for t in (inputs, grads):
        h.update(t.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def find_own_rows(inputs: torch.Tensor, grads: torch.Tensor, rows: int, digest: bytes) -> int | None:
    """Where a call of ``rows`` rows with this ``digest`` starts in a step's batch, if it is there."""
    if rows <= 0 or rows > len(inputs) or len(digest) != 32:
        return None
    for start in range(len(inputs) - rows + 1):
        if rows_digest(inputs[start:start + rows], grads[start:start + rows]) == digest:
            return start
    return None


def encode_reveal(reveal: Reveal, own_at: int | None = None, own_rows: int = 0
                  ) -> tuple[bytes, list[runtime_pb2.Tensor]]:
    """The structure as msgpack and the tensors as hivemind serializes them (no compression). With
    ``own_at``, the ``own_rows`` rows from there are left out of the batch (the trainer has them)."""
    tensors: list[torch.Tensor] = []
    header = _structure(reveal, tensors, own_at, own_rows)
    serialized = [serialize_torch_tensor(t.detach().cpu(), NONE) for t in tensors]
    header["bytes"] = sum(len(t.buffer) for t in serialized)
    return MSGPackSerializer.dumps(header), serialized


def _structure(reveal: Reveal, tensors: list[torch.Tensor], own_at: int | None, own_rows: int) -> dict:
    names = sorted(reveal.module)
    tensors.extend(reveal.module[n] for n in names)
    optimizer = None
    if reveal.optimizer is not None:
        state = []
        for index in sorted(reveal.optimizer.get("state", {})):
            entries = []
            for name, value in sorted(reveal.optimizer["state"][index].items()):
                if isinstance(value, torch.Tensor):
                    entries.append([name, True, None])
                    tensors.append(value)
                else:
                    entries.append([name, False, value])
            state.append([index, entries])
        optimizer = {"state": state, "groups": list(reveal.optimizer.get("param_groups", []))}
    batch = None
    if reveal.inputs is not None and reveal.grads is not None:
        x, g = reveal.inputs, reveal.grads
        if own_at is not None:
            x = torch.cat([x[:own_at], x[own_at + own_rows:]])
            g = torch.cat([g[:own_at], g[own_at + own_rows:]])
        batch = {"own_at": own_at}
        tensors.extend((x, g))
    parent = _structure(reveal.parent, tensors, None, 0) if reveal.parent is not None else None
    return {"version": reveal.version, "weights": names, "optimizer": optimizer,
            "optimizer_digest": reveal.optimizer_digest, "batch": batch, "parent": parent}


def decode_reveal(header_bytes: bytes, tensors: Sequence[runtime_pb2.Tensor],
                  own: tuple[torch.Tensor, torch.Tensor] | None = None) -> Reveal:
    """A reveal from ``encode_reveal``'s two parts, the trainer's own rows ``own`` spliced back into the
    batch. Raises ValueError on anything malformed; nothing is unpickled."""
    try:
        header = MSGPackSerializer.loads(header_bytes)
    except Exception as e:
        raise ValueError(f"the reveal's structure is not msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict) or type(header.get("bytes")) is not int:
        raise ValueError("the reveal's structure is malformed")
    if sum(len(t.buffer) for t in tensors) != header["bytes"]:
        raise ValueError("the reveal's tensors are not the size its structure announced")
    queue = list(tensors)
    reveal = _from_header(header, queue, own, depth=0)
    if queue:
        raise ValueError(f"the reveal has {len(queue)} tensors more than its structure names")
    return replace(reveal, wire_bytes=header["bytes"])


def _from_header(h: Any, queue: list[runtime_pb2.Tensor], own: tuple[torch.Tensor, torch.Tensor] | None,
                 depth: int) -> Reveal:
    _expect(isinstance(h, dict) and type(h.get("version")) is int and isinstance(h.get("weights"), list)
            and all(isinstance(n, str) for n in h["weights"]) and len(set(h["weights"])) == len(h["weights"]),
            "its version or weight names")
    module = {name: _tensor(queue) for name in h["weights"]}
    optimizer = _optimizer(h.get("optimizer"), queue)
    digest = h.get("optimizer_digest")
    _expect(digest is None or (isinstance(digest, bytes) and len(digest) == 32), "the optimizer's digest")
    _expect((optimizer is None) != (digest is None), "an optimizer state and its digest both or neither")
    inputs = grads = None
    if h.get("batch") is not None:
        own_at = h["batch"].get("own_at") if isinstance(h["batch"], dict) else "?"
        inputs, grads = _tensor(queue), _tensor(queue)
        _expect(inputs.dim() == 2 and grads.shape == inputs.shape, "its batch's shapes")
        if own_at is not None:
            _expect(type(own_at) is int and 0 <= own_at <= len(inputs) and own is not None, "where its rows go")
            inputs = torch.cat([inputs[:own_at], own[0].to(inputs.dtype), inputs[own_at:]])
            grads = torch.cat([grads[:own_at], own[1].to(grads.dtype), grads[own_at:]])
    parent = None
    if h.get("parent") is not None:
        _expect(depth == 0, "a parent of a parent")
        parent = _from_header(h["parent"], queue, None, depth + 1)
    return Reveal(h["version"], module, optimizer, parent, inputs, grads, digest)


def _optimizer(o: Any, queue: list[runtime_pb2.Tensor]) -> dict | None:
    if o is None:
        return None
    _expect(isinstance(o, dict) and isinstance(o.get("state"), list) and isinstance(o.get("groups"), list)
            and all(isinstance(g, dict) and all(isinstance(k, str) for k in g) for g in o["groups"]),
            "its optimizer state")
    state: dict[int, dict[str, Any]] = {}
    for item in o["state"]:
        _expect(isinstance(item, list) and len(item) == 2 and type(item[0]) is int and item[0] not in state
                and isinstance(item[1], list), "an optimizer state entry")
        entries = state[item[0]] = {}
        for entry in item[1]:
            _expect(isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and entry[0] not in entries, "an optimizer state entry")
            entries[entry[0]] = _tensor(queue) if entry[1] is True else entry[2]
    return {"state": state, "param_groups": o["groups"]}


def _tensor(queue: list[runtime_pb2.Tensor]) -> torch.Tensor:
    _expect(bool(queue), "fewer tensors than its structure names")
    part = queue.pop(0)
    _expect(part.compression == NONE, "a compressed tensor (its exact bytes are committed)")
    try:
        return deserialize_torch_tensor(part)
    except Exception as e:
        raise ValueError(f"a revealed tensor does not deserialize: {type(e).__name__}: {str(e)[:80]}") from None


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"the reveal is malformed: {what}")


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
    if parent.optimizer is None:
        raise AuditFailed("the reveal of a trained version lacks the optimizer state its step started from")
    rows = _find_rows(reveal.inputs, reveal.grads, inputs, grads)
    module = _module(spec, parent)
    optimizer = build_optimizer(spec.optimizer, module.parameters(), lr=spec.lr)
    _check_hyperparameters(optimizer, parent.optimizer)
    try:  # whatever a server put in its state, a failure to recompute from it is the server's
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
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise AuditFailed(f"the revealed step cannot be recomputed: {type(e).__name__}: {str(e)[:120]}") from None
    if not num <= tolerance.update_rtol * den + tolerance.atol:
        raise AuditFailed(f"the revealed optimizer step is off by {num / max(den, 1e-30):.1%} of the recomputed one")


def _check_hyperparameters(optimizer: torch.optim.Optimizer, revealed: Mapping[str, Any]) -> None:
    """The revealed optimizer's hyperparameters are the experiment's: a server that claims another
    learning rate (0: a frozen copy's step is then the right one) or other betas fails."""
    ours = [{k: v for k, v in g.items() if k not in _HOW_IT_RUNS} for g in optimizer.state_dict()["param_groups"]]
    groups = revealed.get("param_groups") if isinstance(revealed, Mapping) else None
    theirs = [{k: v for k, v in g.items() if k not in _HOW_IT_RUNS} for g in groups or () if isinstance(g, Mapping)]
    if theirs != ours:
        raise AuditFailed(f"the revealed optimizer's hyperparameters {str(theirs)[:160]} are not the experiment's")


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
