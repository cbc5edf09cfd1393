"""Hostile and bad input (issue 6 item 5): each refused with one clear line, nothing crashes, no file is lost.

This package holds one test module per place where input enters; this module holds what they share:
the test experiment, the files-before-and-after checks, a home as a volunteer that ran before leaves
it, and the manifest mutations. The fake coordinator is in ``tests/fakes.py``, its fixture in this
package's ``conftest.py``.

Where each row is tested: ``test_manifest_input.py`` (manifest file or body), ``test_coordinator_answers.py``
(a coordinator down, slow or wrong; random answers; a bad leaderboard), ``test_cli_start.py`` (``volunteer
start`` end to end), ``test_state_files.py`` (full disk, corrupt state files, record keys),
``test_peer_requests.py`` (a real volunteer and a plain hivemind client), ``test_unsafe_code.py`` (the
scanner). One table per place where input enters. "Untouched" means every file that was there before (state,
checkpoints, identity, cached manifest) has the same bytes and mtime after, and nothing new was
written but the instance lock.

=================================  ===================================================================
input                              expected
=================================  ===================================================================
manifest file / coordinator body   ``ManifestError`` / ``CoordinatorError``, one line naming the field;
  missing field, wrong type,       CLI: exit 2, ``error: manifest: <field> ...`` or ``error:
  unknown block, negative or       coordinator URL sent an invalid experiment: manifest: ...``;
  absurd size, huge body           bodies over 256 KiB (file) / 1 MiB (HTTP) refused without parsing
coordinator down, slow, HTML,      transient (down, slow, 5xx) retried with backoff, wrong answers
  500, invalid JSON, huge body     (HTML, JSON, size) not; the cached manifest and peers are used
                                   when there is a cache, which stays untouched; else one line
                                   ``... unreachable after N attempts (...) and no cached experiment``
random bodies and status codes     hypothesis: only ``CoordinatorError`` (or a valid Experiment)
state dir is a file, lies under    CLI: exit 2, one ``error:`` line, the home untouched
  a file, is not writable
disk full (/dev/full)              checkpoint, lifetime, cache and state writes fail without
                                   harming the previous file and leave no temp file behind
corrupt node.json, lifetime.json,  ignored or moved aside with a warning; the last good copy is used
  checkpoint                       (unit level, and end to end by the live volunteer of test_peer_requests)
malformed requests from a peer     the peer gets an error; the server keeps serving and counts only
                                   good samples (a real ``volunteer start``, a plain hivemind client)
product code                       no pickle, eval, exec, or ``torch.load`` without ``weights_only``
=================================  ===================================================================

Covered elsewhere, not repeated here: a port already in use (``test_cli.py::test_volunteer_on_a_taken_port``,
``test_coordinator.py::test_http_port_in_use_is_one_line_error``), a second client on the same state
dir (``test_cli.py::test_second_volunteer_on_the_same_state_dir_is_refused``), an unreachable coordinator
with no cache through the CLI (``test_cli.py::test_start_with_an_unreachable_coordinator_and_no_cache``),
an unknown block through the CLI (``test_cli.py::test_start_with_a_bad_manifest_names_the_field``),
corrupt, foreign and code-carrying checkpoints (``test_checkpoints.py``), a corrupt coordinator cache
(``test_coordinator.py::test_corrupt_cache_is_reported_and_left_alone``), the full manifest grammar
(``test_manifest.py``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Callable

from tests.conftest import TEST_MANIFEST
from tests.fakes import Answer, FakeCoordinator
from volunteer.core.manifest import MAX_MANIFEST_BYTES, loads
from volunteer.core.seed_client import MAX_BODY_BYTES, cache_path
from volunteer.node.stats import LifetimeStore, Totals
from volunteer.serving.checkpoints import CheckpointStore, ExpertCheckpoint
from volunteer.serving.experts import build_expert

MANIFEST = loads(TEST_MANIFEST, fmt="toml")
PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmXrPbzKT1gnMfAVgLY6ANgk2xKHzHBCMXjVEC5oUJsvSh"
PEERS_BODY = json.dumps({"peer_id": "QmSeed", "maddrs": [PEER]}).encode()

# fetch settings for in-process cases: the same code path as the CLI, with the waits shrunk
FAST = dict(attempts=3, timeout=0.5, backoff=0.01)


# --- helpers: files before and after --------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file under ``root``: its bytes and mtime, by relative path."""
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def assert_untouched(before: dict[str, tuple[bytes, int]], root: Path, new_allowed: tuple[str, ...] = ()) -> None:
    after = snapshot(root)
    changed = sorted(name for name, value in before.items() if after.get(name) != value)
    assert not changed, f"changed or removed: {changed}"
    created = sorted(set(after) - set(before) - set(new_allowed))
    assert not created, f"created: {created}"


def assert_one_line(error: BaseException, *expected: str) -> str:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    assert "Traceback" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def seed_home(home: Path) -> None:
    """What a volunteer that ran before leaves: state, lifetime totals, identity, a checkpoint, a cache."""
    (home / "state").mkdir(parents=True)
    (home / "state" / "node.json").write_text(json.dumps(
        {"experiment": "test-lm", "uids": ["testlm_ffn0.0.1"], "device": "cpu", "peer_id": "QmOld", "saved": 1.0}))
    LifetimeStore(home / "state" / "lifetime.json").save(Totals(forward_samples=70, backward_samples=30))
    (home / "data").mkdir()
    (home / "data" / "identity.key").write_bytes(b"\x08\x00\x12\x40" + bytes(range(64)))
    CheckpointStore(home / "data" / "checkpoints" / "test-lm").save(fresh_checkpoint("testlm_ffn0.0.1", 3))
    other = cache_path(home / "cache", "http://127.0.0.1:1")
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({"url": "http://127.0.0.1:1", "manifest": MANIFEST.to_dict(),
                                 "initial_peers": [PEER], "fetched_at": 1.0}))


def fresh_checkpoint(uid: str, updates: int) -> ExpertCheckpoint:
    module = build_expert("residual_ffn", MANIFEST.d_model, 64, seed=updates)
    return ExpertCheckpoint(uid, "small", module.state_dict(), None, updates)


# --- manifests: one table, read from a file and from a coordinator --------------------------------


def _toml_dict() -> dict[str, Any]:
    return tomllib.loads(TEST_MANIFEST)


def mutated(change: Callable[[dict[str, Any]], Any]) -> bytes:
    data = _toml_dict()
    change(data)
    return json.dumps(data).encode()


def set_at(path: tuple, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for step in path[:-1]:
            data = data[step]
        data[path[-1]] = value
    return change


def delete_at(path: tuple) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for step in path[:-1]:
            data = data[step]
        del data[path[-1]]
    return change


HUGE_FILE = MANIFEST.to_json().encode() + b" " * MAX_MANIFEST_BYTES  # valid JSON, just too big
HUGE_HTTP = MANIFEST.to_json().encode() + b" " * MAX_BODY_BYTES


def new_coordinator() -> FakeCoordinator:
    """A coordinator that serves the test experiment and one peer until a test tells it otherwise."""
    return FakeCoordinator({"/v1/experiment": Answer(body=MANIFEST.to_json().encode()),
                            "/v1/peers": Answer(body=PEERS_BODY)})
