"""Files on disk: a full disk, corrupt node.json, record keys, lifetime totals; nothing is lost."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.fakes import FakeCoordinator
from tests.hostile.common import (
    FAST,
    MANIFEST,
    PEER,
    assert_untouched,
    fresh_checkpoint,
    snapshot,
)
from volunteer.core.paths import default_paths, write_atomic
from volunteer.core.seed_client import Experiment, cache_path, fetch_experiment
from volunteer.node.stats import LifetimeStore, Totals
from volunteer.serving.checkpoints import CheckpointStore

# --- a full disk: every writer keeps the previous file whole ----------------------------------------


def _full_at(path: Path) -> Path:
    """Make ``write_atomic(path)`` write into /dev/full (ENOSPC) by planting its temp name as a link there."""
    link = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    link.symlink_to("/dev/full")
    return link


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full to simulate a full disk")
@pytest.mark.parametrize("writer", ["checkpoint", "lifetime", "node-state", "coordinator-cache"])
def test_a_full_disk_keeps_the_previous_file(tmp_path: Path, coordinator: FakeCoordinator, writer: str,
                                             caplog: pytest.LogCaptureFixture):
    if writer == "checkpoint":
        store = CheckpointStore(tmp_path / "checkpoints")
        store.save(fresh_checkpoint("testlm_ffn0.0.1", 1))
        store.save(fresh_checkpoint("testlm_ffn0.0.1", 2))
        before = snapshot(tmp_path)
        _full_at(store.directory / "testlm_ffn0.0.1.pt.new")
        with pytest.raises(OSError, match="No space left"):
            store.save(fresh_checkpoint("testlm_ffn0.0.1", 3))
        assert_untouched(before, tmp_path)
        assert store.load("testlm_ffn0.0.1", "small").updates == 2
    elif writer == "lifetime":
        lifetime = LifetimeStore(tmp_path / "lifetime.json")
        lifetime.save(Totals(forward_samples=5))
        lifetime.save(Totals(forward_samples=9))
        _full_at(lifetime.path)
        with pytest.raises(OSError, match="No space left"):
            lifetime.save(Totals(forward_samples=12))
        # the latest totals survive (LifetimeStore renames lifetime.json to .prev before writing: not
        # "untouched", but nothing is lost, and load() reads the .prev copy)
        assert lifetime.load() == Totals(forward_samples=9)
        assert {p.name for p in tmp_path.iterdir()} <= {"lifetime.json", "lifetime.json.prev"}
    elif writer == "node-state":
        state = tmp_path / "node.json"
        state.write_text('{"experiment": "test-lm", "uids": []}')
        before = snapshot(tmp_path)
        _full_at(state)
        with pytest.raises(OSError, match="No space left"):
            write_atomic(state, lambda f: f.write(b'{"experiment": "test-lm", "uids": ["x"]}'))
        assert_untouched(before, tmp_path)
    else:
        fetch_experiment(coordinator.url, tmp_path, **FAST)
        before = snapshot(tmp_path)
        _full_at(cache_path(tmp_path, coordinator.url))
        with caplog.at_level(logging.WARNING, logger="volunteer.core.seed_client"):
            assert fetch_experiment(coordinator.url, tmp_path, **FAST).source == "coordinator"  # a cache is optional
        assert "could not cache the experiment" in caplog.text and "No space left" in caplog.text
        assert_untouched(before, tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], "a temp file was left behind"


# --- corrupt state files -------------------------------------------------------------------------


@pytest.fixture
def node(volunteer_home: Path, tmp_path: Path):
    """A VolunteerNode that is built but not started: what reads node.json at start."""
    from volunteer.config.settings import Settings
    from volunteer.node.node import VolunteerNode

    paths = default_paths().ensure()
    manifest_file = tmp_path / "m.json"
    manifest_file.write_text(MANIFEST.to_json())
    return VolunteerNode(Settings(experiment_file=manifest_file), paths, Experiment(MANIFEST, (PEER,), "file"))


# id, node.json bytes (None: a directory in its place), uids reused, warned
NODE_STATES = [
    pytest.param(b"\x00\xff\xfegarbage", [], True, id="garbage"),
    pytest.param(b'{"experiment": "test-lm", "uids": ["testlm_ff', [], True, id="truncated"),
    pytest.param(b"[1, 2, 3]", [], False, id="a-list"),
    pytest.param(b'{"experiment": "other-lm", "uids": ["testlm_ffn0.0.1"]}', [], False, id="other-experiment"),
    pytest.param(b'{"experiment": "test-lm", "uids": "testlm_ffn0.0.1"}', [], False, id="uids-a-string"),
    pytest.param(b'{"experiment": "test-lm", "uids": [1, null, "../../etc/passwd", "testlm_ffn9.9.9", '
                 b'"testlm_ffn0.1.2", {"a": 1}]}', ["testlm_ffn0.1.2"], False, id="uids-mixed-junk"),
    pytest.param(None, [], True, id="a-directory"),
    pytest.param(b"[" * 100_000, [], True, id="deeply-nested"),
]


@pytest.mark.parametrize("body, uids, warned", NODE_STATES)
def test_corrupt_node_state_is_ignored_and_left_alone(node, body: bytes | None, uids: list[str], warned: bool,
                                                     caplog: pytest.LogCaptureFixture):
    if body is None:
        node.state_file.mkdir()
    else:
        node.state_file.write_bytes(body)
    before = snapshot(node.paths.state_dir)
    with caplog.at_level(logging.WARNING):
        assert node._previous_uids() == uids
    assert_untouched(before, node.paths.state_dir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warnings) == warned, warnings
    assert all("\n" not in w and "starting afresh" in w for w in warnings)


@pytest.mark.parametrize("body", [b"", b"junk", b"\x30\x82\x01\x0a" + bytes(64), None], ids=["empty", "junk",
                                                                                     "truncated-der", "a-directory"])
def test_a_corrupt_record_key_is_refused_in_one_line_and_kept(tmp_path: Path, body: bytes | None):
    from volunteer.core.records import use_record_key

    path = tmp_path / "data" / "record-key.der"
    path.parent.mkdir()
    path.mkdir() if body is None else path.write_bytes(body)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="record signing key .* is unreadable .*move it away to sign as a new peer") as raised:
        use_record_key(path)
    assert "\n" not in str(raised.value)
    assert_untouched(before, tmp_path)


def test_the_record_key_is_made_once_owner_only_and_signs_every_run(tmp_path: Path):
    from hivemind.dht.crypto import RSASignatureValidator

    from volunteer.core.records import use_record_key

    path = tmp_path / "data" / "record-key.der"
    first = use_record_key(path)
    owner = RSASignatureValidator().local_public_key  # what owner_subkey and the DHT's validator sign with
    assert path.stat().st_mode & 0o777 == 0o600
    again = use_record_key(path)  # a restart, or the next run
    assert again.to_bytes() == first.to_bytes() == path.read_bytes()
    assert RSASignatureValidator().local_public_key == owner


def test_two_processes_making_the_record_key_at_once_agree_on_one(tmp_path: Path):
    from volunteer.core.records import _create_once, record_key

    path = tmp_path / "data" / "trainer-key.der"
    assert _create_once(path, b"first")
    assert not _create_once(path, b"second"), "the second writer must not replace the first one's key"
    assert path.read_bytes() == b"first" and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["trainer-key.der"]  # no temp file left
    made = tmp_path / "other.der"
    assert record_key(made).to_bytes() == record_key(made).to_bytes() == made.read_bytes()


# id, lifetime.json bytes
LIFETIMES = [
    pytest.param(b"\x00\xff", id="garbage"),
    pytest.param(b'{"forward_samples": 12', id="truncated"),
    pytest.param(b"[]", id="a-list"),
    pytest.param(b'{"forward_samples": -5}', id="negative"),
    pytest.param(b'{"forward_samples": "many"}', id="a-string"),
    pytest.param(b'{"forward_samples": NaN}', id="nan"),
    pytest.param(b'{"forward_samples": true}', id="a-bool"),
    pytest.param(b'{"forward_samples": 1e999}', id="infinite"),
    pytest.param(b'{"busy_seconds": 1' + b"0" * 400 + b"}", id="int-beyond-float"),
    pytest.param(b"[" * 100_000, id="deeply-nested"),
]


@pytest.mark.parametrize("body", LIFETIMES)
def test_corrupt_lifetime_stats_are_moved_aside_and_the_backup_used(tmp_path: Path, body: bytes,
                                                                    caplog: pytest.LogCaptureFixture):
    store = LifetimeStore(tmp_path / "lifetime.json")
    store.save(Totals(forward_samples=40, backward_samples=20, optimizer_steps=2))
    store.save(Totals(forward_samples=50, backward_samples=25, optimizer_steps=3))
    store.path.write_bytes(body)
    backup = store.backup.read_bytes()
    with caplog.at_level(logging.WARNING, logger="volunteer.core.files"):
        assert store.load() == Totals(forward_samples=40, backward_samples=20, optimizer_steps=2)
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("lifetime.json.corrupt-")]
    assert aside.read_bytes() == body, "the corrupt file must be kept, not lost"
    assert store.backup.read_bytes() == backup
    [warning] = [r.getMessage() for r in caplog.records]
    assert "\n" not in warning and aside.name in warning


def test_both_lifetime_files_corrupt_start_from_zero_and_keep_both(tmp_path: Path):
    store = LifetimeStore(tmp_path / "lifetime.json")
    store.path.write_bytes(b"{")
    store.backup.write_bytes(b"}")
    assert store.load() == Totals()
    assert sorted(p.read_bytes() for p in tmp_path.iterdir()) == [b"{", b"}"]
