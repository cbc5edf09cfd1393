"""Expert checkpoints: atomic, with a fallback to the previous file; foreign or code-carrying files are refused."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TEST_MANIFEST
from volunteer.core.manifest import loads
from volunteer.serving.backends import CountingBackend, build_backends, initial_seed
from volunteer.serving.checkpoints import (
    CheckpointStore,
    ExpertCheckpoint,
    write_atomic,
)
from volunteer.serving.experts import build_expert

UID = "testlm_ffn0.0.1"
OTHER_UID = "testlm_ffn0.1.2"
D_MODEL, D_HIDDEN = 32, 64


def trained_expert(steps: int = 1, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A real allowlisted expert with an Adam optimizer that has taken ``steps`` real steps."""
    module = build_expert("residual_ffn", D_MODEL, D_HIDDEN, seed=seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, D_MODEL, generator=generator)
        module(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return module, optimizer


def checkpoint_of(module, optimizer, uid: str = UID, expert_type: str = "small", updates: int = 1) -> ExpertCheckpoint:
    return ExpertCheckpoint(uid, expert_type, module.state_dict(), optimizer.state_dict(), updates)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Deep equality of nested dicts/lists/tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} != {getattr(b, 'keys', list)()}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "checkpoints" / "test-lm")


# --- CheckpointStore -----------------------------------------------------------------------------


def test_save_then_load_round_trips_module_and_optimizer(store: CheckpointStore):
    module, optimizer = trained_expert(steps=1)
    assert optimizer.state_dict()["state"], "one real step must have created Adam's moments"
    path = store.save(checkpoint_of(module, optimizer, updates=1))
    assert path == store.directory / f"{UID}.pt"
    assert files(store.directory) == {f"{UID}.pt"}  # no staged or temporary file left behind

    loaded = store.load(UID, "small")
    assert loaded is not None
    assert (loaded.uid, loaded.expert_type, loaded.updates) == (UID, "small", 1)
    assert_same(module.state_dict(), loaded.module, "module")
    assert_same(optimizer.state_dict(), loaded.optimizer, "optimizer")

    # the restored pair continues training exactly like the original would
    fresh = build_expert("residual_ffn", D_MODEL, D_HIDDEN, seed=123)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh.load_state_dict(loaded.module)
    fresh_optimizer.load_state_dict(loaded.optimizer)
    x = torch.randn(8, D_MODEL, generator=torch.Generator().manual_seed(7))
    for m, opt in ((module, optimizer), (fresh, fresh_optimizer)):
        m(x).pow(2).mean().backward()
        opt.step()
    assert_same(module.state_dict(), fresh.state_dict(), "after-step")


def test_load_of_a_missing_checkpoint_is_none(store: CheckpointStore):
    assert store.load(UID, "small") is None
    store.directory.mkdir(parents=True)
    assert store.load(UID, "small") is None


def test_second_save_keeps_the_first_as_prev(store: CheckpointStore):
    first, first_opt = trained_expert(steps=1, seed=1)
    second, second_opt = trained_expert(steps=2, seed=2)
    store.save(checkpoint_of(first, first_opt, updates=1))
    store.save(checkpoint_of(second, second_opt, updates=2))
    assert files(store.directory) == {f"{UID}.pt", f"{UID}.prev.pt"}

    latest = store.load(UID, "small")
    assert latest.updates == 2
    assert_same(second.state_dict(), latest.module)
    previous = CheckpointStore._read(store.directory / f"{UID}.prev.pt", UID, "small")
    assert previous.updates == 1
    assert_same(first.state_dict(), previous.module)
    assert_same(first_opt.state_dict(), previous.optimizer)


def test_truncated_latest_falls_back_to_previous_and_is_moved_aside(store: CheckpointStore, caplog):
    first, first_opt = trained_expert(steps=1, seed=1)
    second, second_opt = trained_expert(steps=2, seed=2)
    store.save(checkpoint_of(first, first_opt, updates=1))
    latest = store.save(checkpoint_of(second, second_opt, updates=2))
    whole = latest.read_bytes()
    latest.write_bytes(whole[: len(whole) // 2])
    truncated = latest.read_bytes()

    with caplog.at_level(logging.WARNING, logger="volunteer.core.files"):
        loaded = store.load(UID, "small")

    assert loaded is not None and loaded.updates == 1
    assert_same(first.state_dict(), loaded.module)
    assert not latest.exists()
    aside = [p for p in store.directory.iterdir() if p.name.startswith(f"{UID}.pt.corrupt-")]
    assert len(aside) == 1
    assert aside[0].read_bytes() == truncated  # kept, byte for byte, for a post-mortem
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "volunteer.core.files"]
    assert len(warnings) == 1
    assert str(latest) in warnings[0].getMessage() and aside[0].name in warnings[0].getMessage()

    # the next save starts a fresh latest file; the good previous one is still there
    store.save(checkpoint_of(second, second_opt, updates=3))
    assert store.load(UID, "small").updates == 3


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"this is not a checkpoint\n" * 10, id="text"),
        pytest.param(bytes(range(256)) * 64, id="binary"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 100, id="zip-header-only"),
    ],
)
def test_garbage_bytes_are_refused(store: CheckpointStore, caplog, garbage: bytes):
    store.directory.mkdir(parents=True)
    path = store.directory / f"{UID}.pt"
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="volunteer.core.files"):
        assert store.load(UID, "small") is None
    assert not path.exists()
    (aside,) = [p for p in store.directory.iterdir() if ".corrupt-" in p.name]
    assert aside.read_bytes() == garbage
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_garbage_latest_with_a_good_previous(store: CheckpointStore):
    module, optimizer = trained_expert()
    store.save(checkpoint_of(module, optimizer, updates=4))
    store.save(checkpoint_of(module, optimizer, updates=5))
    (store.directory / f"{UID}.pt").write_bytes(os.urandom(4096))
    assert store.load(UID, "small").updates == 4


@pytest.mark.parametrize(
    "saved_uid, saved_type",
    [pytest.param(OTHER_UID, "small", id="other-uid"), pytest.param(UID, "large", id="other-type"),
     pytest.param(OTHER_UID, "large", id="other-both")],
)
def test_a_foreign_checkpoint_renamed_into_place_is_refused(store: CheckpointStore, saved_uid, saved_type):
    module, optimizer = trained_expert()
    written = store.save(checkpoint_of(module, optimizer, uid=saved_uid, expert_type=saved_type))
    if written.name != f"{UID}.pt":
        os.replace(written, store.directory / f"{UID}.pt")
    assert store.load(UID, "small") is None
    assert not (store.directory / f"{UID}.pt").exists()
    assert any(".corrupt-" in name for name in files(store.directory))


def test_a_plain_tensor_or_dict_without_format_is_refused(store: CheckpointStore):
    store.directory.mkdir(parents=True)
    torch.save({"uid": UID, "expert_type": "small", "module": {}}, store.directory / f"{UID}.pt")
    assert store.load(UID, "small") is None
    torch.save(torch.zeros(3), store.directory / f"{UID}.pt")
    assert store.load(UID, "small") is None


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class CodeOnLoad:
    """Unpickling this calls ``_touch(marker)``: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


@pytest.mark.parametrize("wrap", [pytest.param(False, id="bare"), pytest.param(True, id="inside-a-checkpoint")])
def test_a_pickled_object_is_refused_without_running_code(store: CheckpointStore, tmp_path: Path, wrap: bool):
    # the payload is live: plain unpickling runs it
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(CodeOnLoad(control)))
    assert control.exists()

    marker = tmp_path / "marker"
    payload: Any = CodeOnLoad(marker)
    if wrap:
        payload = dict(format=1, uid=UID, expert_type="small", module={"weight": payload}, optimizer=None, updates=1)
    store.directory.mkdir(parents=True)
    torch.save(payload, store.directory / f"{UID}.pt")

    assert store.load(UID, "small") is None
    assert not marker.exists(), "loading a checkpoint executed code from it"
    assert any(".corrupt-" in name for name in files(store.directory))


def test_the_staged_file_is_used_when_nothing_else_is_whole(store: CheckpointStore):
    """A crash after the new file is whole but before it was renamed: ``<uid>.pt.new`` is still usable."""
    module, optimizer = trained_expert()
    latest = store.save(checkpoint_of(module, optimizer, updates=9))
    os.replace(latest, store.directory / f"{UID}.pt.new")
    assert store.load(UID, "small").updates == 9


# --- write_atomic --------------------------------------------------------------------------------


def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path: Path):
    target = tmp_path / "state.json"
    write_atomic(target, lambda f: f.write(b"first"))
    write_atomic(target, lambda f: f.write(b"second"))
    assert target.read_bytes() == b"second"
    assert files(tmp_path) == {"state.json"}


def test_interrupted_write_atomic_leaves_the_old_file_untouched(tmp_path: Path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old and whole")

    def half_then_crash(f) -> None:
        f.write(b"new but half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomic(target, half_then_crash)
    assert target.read_bytes() == b"old and whole"
    assert files(tmp_path) == {"state.json"}

    # and with no old file, an interrupted write creates nothing
    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "fresh.json", half_then_crash)
    assert files(tmp_path) == {"state.json"}


def test_interrupted_save_keeps_the_previous_checkpoint(store: CheckpointStore, monkeypatch):
    module, optimizer = trained_expert()
    store.save(checkpoint_of(module, optimizer, updates=1))

    def crash(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        store.save(checkpoint_of(module, optimizer, updates=2))
    monkeypatch.undo()
    assert files(store.directory) == {f"{UID}.pt"}
    assert store.load(UID, "small").updates == 1


# --- serving backends ----------------------------------------------------------------------------

MANIFEST = loads(TEST_MANIFEST, fmt="toml")


def test_build_backends_restores_weights_from_the_checkpoint(store: CheckpointStore):
    module, optimizer = trained_expert(steps=3, seed=5)
    store.save(checkpoint_of(module, optimizer, updates=5))

    backends, restored = build_backends(MANIFEST, [UID, OTHER_UID], 64, store)
    assert restored == [UID]
    assert set(backends) == {UID, OTHER_UID}
    assert_same(module.state_dict(), backends[UID].module.state_dict(), "restored module")
    assert_same(optimizer.state_dict()["state"], backends[UID].optimizer.state_dict()["state"], "restored optimizer")
    assert backends[UID].counters.snapshot().optimizer_steps == 5

    # a uid without a checkpoint starts from weights that depend only on the uid
    fresh = build_expert("residual_ffn", D_MODEL, D_HIDDEN, seed=initial_seed(OTHER_UID))
    assert_same(fresh.state_dict(), backends[OTHER_UID].module.state_dict(), "fresh module")
    assert backends[OTHER_UID].counters.snapshot().optimizer_steps == 0
    assert not backends[OTHER_UID].optimizer.state_dict()["state"]


def test_counting_backend_trains_counts_and_checkpoints(store: CheckpointStore, tmp_path: Path):
    backends, restored = build_backends(MANIFEST, [UID], 64, store)
    assert restored == []
    backend: CountingBackend = backends[UID]
    before = {k: v.clone() for k, v in backend.module.state_dict().items()}
    x = torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(0))

    (out,) = backend.forward(x)
    assert out.shape == (5, D_MODEL)
    assert_same(before, backend.module.state_dict(), "forward must not change weights")
    stats = backend.counters.snapshot()
    assert (stats.forward_batches, stats.forward_samples, stats.backward_samples, stats.optimizer_steps) == (1, 5, 0, 0)

    (grad_x,) = backend.backward(x, torch.ones_like(out))
    assert grad_x.shape == x.shape and torch.isfinite(grad_x).all() and grad_x.abs().sum() > 0
    stats = backend.counters.snapshot()
    assert (stats.backward_batches, stats.backward_samples, stats.optimizer_steps) == (1, 5, 1)
    assert stats.busy_seconds > 0 and stats.last_request is not None
    changed = [k for k in before if not torch.equal(before[k], backend.module.state_dict()[k])]
    assert changed, "a backward step must update the weights"

    backend.backward(x[:3], torch.ones(3, D_MODEL))
    assert backend.counters.snapshot().optimizer_steps == 2
    assert backend.counters.snapshot().backward_samples == 8

    snapshot = backend.to_checkpoint()
    assert (snapshot.uid, snapshot.expert_type, snapshot.updates) == (UID, "small", 2)
    assert_same(backend.module.state_dict(), snapshot.module, "snapshot")
    saved_weights = {k: v.clone() for k, v in snapshot.module.items()}
    store.save(snapshot)

    # the snapshot is a copy: training on does not change what was saved
    backend.backward(x, torch.ones_like(out))
    assert_same(saved_weights, snapshot.module, "snapshot after more training")

    again, restored = build_backends(MANIFEST, [UID], 64, CheckpointStore(store.directory))
    assert restored == [UID]
    assert_same(saved_weights, again[UID].module.state_dict(), "rebuilt module")
    assert_same(snapshot.optimizer, again[UID].optimizer.state_dict(), "rebuilt optimizer")
    assert again[UID].counters.snapshot().optimizer_steps == 2
    assert again[UID].to_checkpoint().updates == 2


def test_a_crash_between_the_two_renames_loads_the_newer_staged_file(tmp_path: Path):
    """save() writes <uid>.pt.new whole, moves <uid>.pt to .prev, then .new to .pt: a crash in between
    leaves .prev (older) and .new (newer, whole); the newer must win, and dead writers' temp files go."""
    store = CheckpointStore(tmp_path)
    module, optimizer = trained_expert()
    store.save(checkpoint_of(module, optimizer, updates=1))
    store.save(checkpoint_of(module, optimizer, updates=2))
    (tmp_path / f"{UID}.pt").replace(tmp_path / f"{UID}.pt.new")  # as if killed before the last rename
    (tmp_path / f".{UID}.pt.new.999.tmp").write_bytes(b"half a checkpoint")
    assert store.sweep() == 1 and not list(tmp_path.glob(".*.tmp"))
    assert store.load(UID, "small").updates == 2
