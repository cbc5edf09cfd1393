"""Hostile and bad input (issue 6 item 5): each refused with one clear line, nothing crashes, no file is lost.

One table per place where input enters. "Untouched" means every file that was there before (state,
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
  checkpoint                       (unit level here, and end to end by the live volunteer below)
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

import ast
import concurrent.futures
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import TEST_MANIFEST, Processes, serving_event, status, wait_for
from tests.test_cli import VOLUNTEER, one_line_error, run
from tests.test_manifest import json_values
from volunteer.core import records
from volunteer.core.harness import start_volunteer
from volunteer.core.manifest import MAX_MANIFEST_BYTES, ManifestError, load, loads
from volunteer.core.paths import default_paths, write_atomic
from volunteer.core.seed_client import (
    MAX_BODY_BYTES,
    CoordinatorError,
    Experiment,
    cache_path,
    fetch_experiment,
)
from volunteer.node.stats import LifetimeStore, Totals
from volunteer.serving.checkpoints import CheckpointStore, ExpertCheckpoint
from volunteer.serving.experts import build_expert

REPO = Path(__file__).resolve().parent.parent
MANIFEST = loads(TEST_MANIFEST, fmt="toml")
PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmXrPbzKT1gnMfAVgLY6ANgk2xKHzHBCMXjVEC5oUJsvSh"
PEERS_BODY = json.dumps({"peer_id": "QmSeed", "maddrs": [PEER]}).encode()

# fetch settings for in-process cases: the same code path as the CLI, with the waits shrunk
FAST = dict(attempts=3, timeout=0.5, backoff=0.01)
SLOW_ANSWER = 1.5  # seconds a "slow" coordinator sleeps: longer than FAST's timeout


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


# --- a coordinator on 127.0.0.1 that answers what the test says ------------------------------------


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    delay: float = 0.0  # seconds to sleep before answering (a slow coordinator)


class FakeCoordinator:
    """stdlib ``http.server`` in a thread; ``answers`` maps a path to what it returns, ``hits`` counts calls."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {"/v1/experiment": Answer(body=MANIFEST.to_json().encode()),
                                           "/v1/peers": Answer(body=PEERS_BODY)}
        self.hits: dict[str, int] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.server.handle_error = lambda request, address: None  # a client that hung up is expected here
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs=dict(poll_interval=0.05),
                                       name="fake-coordinator", daemon=True)
        self.thread.start()

    def answer(self, path: str = "/v1/experiment", **kw: Any) -> None:
        self.answers[path] = Answer(**kw)

    def stop(self) -> None:
        """Afterwards the port is closed: a coordinator that is down. Safe to call twice."""
        if not self.thread.is_alive():
            return
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _handler_for(fake: FakeCoordinator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?")[0]
            fake.hits[path] = fake.hits.get(path, 0) + 1
            answer = fake.answers.get(path, Answer(404, b"not found", "text/plain"))
            time.sleep(min(answer.delay, 5.0))
            try:
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
            except OSError:
                pass  # the client gave up (timeout, body too large): what these tests provoke

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def coordinator() -> Iterator[FakeCoordinator]:
    fake = FakeCoordinator()
    try:
        yield fake
    finally:
        fake.stop()


# --- manifests: one table, read from a file and from a coordinator --------------------------------


def _toml_dict() -> dict[str, Any]:
    return tomllib.loads(TEST_MANIFEST)


def _mutated(change: Callable[[dict[str, Any]], Any]) -> bytes:
    data = _toml_dict()
    change(data)
    return json.dumps(data).encode()


def _set(path: tuple, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for step in path[:-1]:
            data = data[step]
        data[path[-1]] = value
    return change


def _delete(path: tuple) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for step in path[:-1]:
            data = data[step]
        del data[path[-1]]
    return change


HUGE_FILE = MANIFEST.to_json().encode() + b" " * MAX_MANIFEST_BYTES  # valid JSON, just too big
HUGE_HTTP = MANIFEST.to_json().encode() + b" " * MAX_BODY_BYTES

# id, body, what the one line says (file, then over HTTP when it differs)
BAD_MANIFESTS = [
    ("missing-d_model", _mutated(_delete(("d_model",))), "manifest: missing field d_model"),
    ("missing-layer-grid", _mutated(_delete(("layers", 0, "grid"))), "manifest: missing field layers[0].grid"),
    ("wrong-type-d_model", _mutated(_set(("d_model",), "32")), "manifest: d_model must be an integer"),
    ("wrong-type-grid", _mutated(_set(("layers", 0, "grid"), "2x4")), "manifest: layers[0].grid must be"),
    ("wrong-type-lr", _mutated(_set(("optimizer", "lr"), [1])), "manifest: optimizer.lr must be a number"),
    ("unknown-block", _mutated(_set(("expert_types", 0, "block"), "transformer")),
     "manifest: expert_types[0].block = 'transformer' is not one of"),
    ("block-as-code", _mutated(_set(("expert_types", 0, "block"), "__import__('os').system('id')")),
     "manifest: expert_types[0].block must be a name"),
    ("negative-d_hidden", _mutated(_set(("expert_types", 0, "d_hidden"), -64)),
     "manifest: expert_types[0].d_hidden = -64 is outside"),
    ("negative-max_batch_size", _mutated(_set(("max_batch_size",), -1)), "manifest: max_batch_size = -1 is outside"),
    ("absurd-d_model", _mutated(_set(("d_model",), 10**12)), "manifest: d_model = 1000000000000 is outside"),
    ("absurd-grid", _mutated(_set(("layers", 0, "grid"), [65536, 65536])), "manifest: layers[0].grid must be"),
    ("absurd-seq_len", _mutated(_set(("trainer", "seq_len"), 10**9)), "manifest: trainer.seq_len = 1000000000"),
    ("huge-body", (HUGE_FILE, HUGE_HTTP),
     (f"more than the {MAX_MANIFEST_BYTES} allowed", f"more than {MAX_BODY_BYTES} allowed")),
]


def _case(body: bytes | tuple[bytes, bytes], expected: str | tuple[str, str], over_http: bool) -> tuple[bytes, str]:
    pick = 1 if over_http else 0
    body = body[pick] if isinstance(body, tuple) else body
    return body, expected[pick] if isinstance(expected, tuple) else expected


@pytest.mark.parametrize("body, expected", [pytest.param(b, e, id=i) for i, b, e in BAD_MANIFESTS])
def test_bad_manifest_file_is_one_line(tmp_path: Path, body, expected: str):
    """What ``volunteer start --experiment FILE`` reads (the CLI table below runs a few end to end)."""
    body, expected = _case(body, expected, over_http=False)
    path = tmp_path / "experiment.json"
    path.write_bytes(body)
    with pytest.raises(ManifestError) as info:
        load(path)
    assert_one_line(info.value, expected)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("body, expected", [pytest.param(b, e, id=i) for i, b, e in BAD_MANIFESTS])
def test_bad_manifest_from_a_coordinator(tmp_path: Path, coordinator: FakeCoordinator, body, expected: str):
    """Not retried (asking again will not fix it); with no cache one line, with a cache the cache, untouched."""
    body, expected = _case(body, expected, over_http=True)
    coordinator.answer(body=body)
    with pytest.raises(CoordinatorError) as info:
        fetch_experiment(coordinator.url, tmp_path / "none", **FAST)
    message = assert_one_line(info.value, f"coordinator {coordinator.url} sent ", expected)
    assert message.endswith("and no cached experiment")
    assert coordinator.hits["/v1/experiment"] == 1
    assert not (tmp_path / "none").exists(), "a refused answer must not be cached"

    cache = tmp_path / "cache"
    coordinator.answer(body=MANIFEST.to_json().encode())
    good = fetch_experiment(coordinator.url, cache, **FAST)
    before = snapshot(cache)
    coordinator.answer(body=body)
    assert fetch_experiment(coordinator.url, cache, **FAST) == Experiment(good.manifest, good.initial_peers, "cache")
    assert_untouched(before, cache)


# --- the coordinator misbehaves: retries, backoff, the cache ---------------------------------------

# id, how the coordinator fails (None: down), transient (retried), what the line says
COORDINATOR_FAULTS = [
    ("down", None, True, "unreachable after 3 attempts (connection refused)"),
    ("slow", Answer(body=MANIFEST.to_json().encode(), delay=SLOW_ANSWER), True,
     "unreachable after 3 attempts (timed out)"),
    ("html", Answer(body=b"<html><body>502 Bad Gateway</body></html>", content_type="text/html"), False,
     "sent HTML from /v1/experiment"),
    ("http-500", Answer(500, b"Internal Server Error", "text/plain"), True,
     "unreachable after 3 attempts (HTTP 500 from /v1/experiment)"),
    ("invalid-json", Answer(body=b'{"schema_version": 1, "name": '), False, "sent invalid JSON from /v1/experiment"),
    ("huge-body", Answer(body=b"[" + b"0," * MAX_BODY_BYTES + b"0]"), False, f"more than {MAX_BODY_BYTES} allowed"),
    ("peers-html", "peers", False, "sent HTML from /v1/peers"),
]


FAULT_PARAMS = [pytest.param(f, t, e, id=i) for i, f, t, e in COORDINATOR_FAULTS]


def _break(coordinator: FakeCoordinator, fault: Answer | str | None) -> None:
    if fault is None:
        coordinator.stop()
    elif fault == "peers":
        coordinator.answer("/v1/peers", body=b"<html>login</html>", content_type="text/html")
    else:
        coordinator.answers["/v1/experiment"] = fault


@pytest.mark.parametrize("fault, transient, expected", FAULT_PARAMS)
def test_coordinator_fault_without_a_cache_is_one_line(tmp_path: Path, coordinator: FakeCoordinator, fault,
                                                       transient: bool, expected: str):
    _break(coordinator, fault)
    sleeps: list[float] = []
    started = time.monotonic()
    with pytest.raises(CoordinatorError) as info:
        fetch_experiment(coordinator.url, tmp_path / "cache", sleep=sleeps.append, **FAST)
    message = assert_one_line(info.value, f"coordinator {coordinator.url} ", expected)
    assert message.endswith("and no cached experiment")
    attempts = FAST["attempts"] if transient else 1
    assert len(sleeps) == attempts - 1, sleeps
    assert all(FAST["backoff"] * 2**i * 0.5 <= s <= FAST["backoff"] * 2**i for i, s in enumerate(sleeps)), sleeps
    if fault is not None:  # a request the client gave up on may still be on its way to the handler
        wait_for(lambda: coordinator.hits.get("/v1/experiment") == attempts, 5, f"{attempts} requests")
        assert coordinator.hits["/v1/experiment"] == attempts
    assert time.monotonic() - started < attempts * FAST["timeout"] + 3
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("fault, transient, expected", FAULT_PARAMS)
def test_coordinator_fault_falls_back_to_the_cached_manifest_and_peers(
        tmp_path: Path, coordinator: FakeCoordinator, caplog: pytest.LogCaptureFixture, fault, transient, expected):
    cache = tmp_path / "cache"
    first = fetch_experiment(coordinator.url, cache, **FAST)  # seeds the cache
    assert first.source == "coordinator" and first.initial_peers == (PEER,)
    before = snapshot(cache)
    assert len(before) == 1
    _break(coordinator, fault)
    with caplog.at_level(logging.WARNING, logger="volunteer.core.seed_client"):
        again = fetch_experiment(coordinator.url, cache, sleep=lambda s: None, **FAST)
    assert again == Experiment(first.manifest, first.initial_peers, "cache")
    assert_untouched(before, cache)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert expected in warning and "using the experiment cached" in warning and "\n" not in warning


# --- property: whatever a coordinator sends, only CoordinatorError ------------------------------

_bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", b"null", b"<!doctype html>", b"\xef\xbb\xbf{}", b"[" * 5000, b'{"maddrs": ["/ip4/1"]}']),
)
_statuses = st.sampled_from([200, 200, 200, 204, 302, 404, 429, 500, 503])


@pytest.fixture(scope="module")
def random_coordinator() -> Iterator[tuple[FakeCoordinator, bytes]]:
    """One coordinator for every example, and a cache record it served while it was good."""
    fake = FakeCoordinator()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fetch_experiment(fake.url, Path(tmp), **FAST)
            record = cache_path(Path(tmp), fake.url).read_bytes()
        yield fake, record
    finally:
        fake.stop()


@settings(max_examples=60, deadline=None)
@given(experiment=st.one_of(st.just(MANIFEST.to_json().encode()), _bodies),
       peers=st.one_of(st.just(PEERS_BODY), _bodies), code=_statuses, with_cache=st.booleans())
def test_random_coordinator_answers_give_only_coordinator_errors(random_coordinator, experiment: bytes, peers: bytes,
                                                                 code: int, with_cache: bool):
    fake, record = random_coordinator
    fake.answer(status=code, body=experiment)
    fake.answer("/v1/peers", body=peers)
    with tempfile.TemporaryDirectory() as tmp:
        path = cache_path(Path(tmp), fake.url)
        if with_cache:
            path.write_bytes(record)
        try:
            result = fetch_experiment(fake.url, Path(tmp), attempts=2, timeout=2.0, backoff=0, sleep=lambda s: None)
        except CoordinatorError as e:
            assert not with_cache, f"a cache exists, yet: {e}"
            assert_one_line(e, f"coordinator {fake.url} ")
            assert not path.exists()
            return
        assert isinstance(result, Experiment) and result.source in ("coordinator", "cache")
        if result.source == "cache":
            assert path.read_bytes() == record


# --- `volunteer start` end to end: exit 2, one line, the home untouched ----------------------------


@dataclass
class CliCase:
    argv: list[str]
    home: Path  # what VOLUNTEER_HOME is set to
    watched: Path  # the folder whose files must stay as they were
    cleanup: Callable[[], None] = lambda: None


def _file(tmp: Path, body: bytes, suffix: str = ".json") -> str:
    path = tmp / f"experiment{suffix}"
    path.write_bytes(body)
    return str(path)


def _from_file(body: bytes, suffix: str = ".json"):
    def prepare(home: Path, tmp: Path, fake: FakeCoordinator) -> CliCase:
        seed_home(home)
        return CliCase(["start", "--experiment", _file(tmp, body, suffix), "--initial-peers", PEER], home, home)
    return prepare


def _from_url(fault: Answer):
    def prepare(home: Path, tmp: Path, fake: FakeCoordinator) -> CliCase:
        seed_home(home)
        fake.answers["/v1/experiment"] = fault
        return CliCase(["start", "--coordinator", fake.url], home, home)
    return prepare


def _state_dir_is_a_file(home: Path, tmp: Path, fake: FakeCoordinator) -> CliCase:
    home.mkdir(exist_ok=True)
    (home / "state").write_text("not a directory\n")
    argv = ["start", "--experiment", _file(tmp, MANIFEST.to_json().encode()), "--initial-peers", PEER]
    return CliCase(argv, home, home)


def _home_under_a_file(home: Path, tmp: Path, fake: FakeCoordinator) -> CliCase:
    home.mkdir(exist_ok=True)
    (home / "blocker").write_text("a regular file\n")
    return CliCase(["start", "--experiment", _file(tmp, MANIFEST.to_json().encode()), "--initial-peers", PEER],
                   home / "blocker" / "home", home)


def _unwritable_state_dir(home: Path, tmp: Path, fake: FakeCoordinator) -> CliCase:
    argv = ["start", "--experiment", _file(tmp, MANIFEST.to_json().encode()), "--initial-peers", PEER]
    if os.geteuid() != 0:
        seed_home(home)
        (home / "state").chmod(0o500)
        return CliCase(argv, home, home, cleanup=lambda: (home / "state").chmod(0o700))
    # root ignores file modes: a home on a filesystem that refuses new entries stands in for a read-only one
    unwritable = Path(f"/sys/hivemind-volunteer-test-{os.getpid()}")
    try:
        unwritable.mkdir()
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EROFS, errno.EACCES):
            return CliCase(argv, unwritable, home)
        raise
    unwritable.rmdir()
    pytest.skip("running as root and /sys accepts new directories: no unwritable place to point the home at")


# id, prepare, what the one error line says (format with url=)
CLI_CASES = [
    ("file-negative-size", _from_file(_mutated(_set(("expert_types", 0, "d_hidden"), -64)))),
    ("file-over-256KiB", _from_file(TEST_MANIFEST.encode() + b"#" * (MAX_MANIFEST_BYTES + 1) + b"\n", ".toml")),
    ("url-missing-field", _from_url(Answer(body=_mutated(_delete(("d_model",)))))),
    ("url-body-over-1MiB", _from_url(Answer(body=HUGE_HTTP))),
    ("url-html", _from_url(Answer(body=b"<html>Welcome to nginx</html>", content_type="text/html"))),
    ("url-http-500", _from_url(Answer(500, b"oops", "text/plain"))),
    ("state-dir-is-a-file", _state_dir_is_a_file),
    ("home-under-a-file", _home_under_a_file),
    ("unwritable-state-dir", _unwritable_state_dir),
]
CLI_EXPECTED = {
    "file-negative-size": r"^error: manifest: expert_types\[0\]\.d_hidden = -64 is outside \[8, \d+\]$",
    "file-over-256KiB": rf"^error: manifest: body is \d+ bytes, more than the {MAX_MANIFEST_BYTES} allowed$",
    "url-missing-field": r"^error: coordinator {url} sent an invalid experiment: manifest: missing field d_model "
                         r"and no cached experiment$",
    "url-body-over-1MiB": rf"^error: coordinator {{url}} sent a \d+-byte body from /v1/experiment, more than "
                          rf"{MAX_BODY_BYTES} allowed and no cached experiment$",
    "url-html": r"^error: coordinator {url} sent HTML from /v1/experiment \(.*\) and no cached experiment$",
    "url-http-500": r"^error: coordinator {url} unreachable after 4 attempts \(HTTP 500 from /v1/experiment\) "
                    r"and no cached experiment$",
    "state-dir-is-a-file": r"^error: \[Errno 17\] File exists: '.*/state'$",
    "home-under-a-file": r"^error: .*/blocker/home/.*Not a directory'?$",
    "unwritable-state-dir": r"^error: \[Errno (1|13|30)\] (Operation not permitted|Permission denied|Read-only file "
                            r"system): '.*'$",
}


@pytest.mark.integration
@pytest.mark.parametrize("prepare", [pytest.param(p, id=i) for i, p in CLI_CASES])
def test_volunteer_start_refuses_bad_input_in_one_line(prepare, short_home: Path, tmp_path: Path,
                                                       coordinator: FakeCoordinator, request: pytest.FixtureRequest):
    case = prepare(short_home, tmp_path, coordinator)
    try:
        before = snapshot(case.watched)
        result = run([*VOLUNTEER, *case.argv, "--host", "127.0.0.1"], case.home, timeout=90)
    finally:
        case.cleanup()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    line = one_line_error(result)
    pattern = CLI_EXPECTED[request.node.callspec.id].replace("{url}", re.escape(coordinator.url))
    assert re.match(pattern, line), line
    assert_untouched(before, case.watched, new_allowed=("state/volunteer.lock",))


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


# id, what the coordinator's leaderboard answers a volunteer that asks for its own line
BAD_LEADERBOARDS = [
    pytest.param(Answer(500, b"oops", "text/plain"), id="500"),
    pytest.param(Answer(body=b"<html>login</html>", content_type="text/html"), id="html"),
    pytest.param(Answer(body=b'{"entries": "many", "volunteers": 1}'), id="entries-a-string"),
    pytest.param(Answer(body=b'{"entries": [{"forward_samples": -1, "backward_samples": 0}], "volunteers": 1}'),
                 id="negative"),
    pytest.param(Answer(body=b'{"entries": [{}, {}], "volunteers": 2, "rank": 1}'), id="two-lines"),
    pytest.param(Answer(body=b'{"entries": [], "volunteers": 1, "rank": true}'), id="rank-a-bool"),
    pytest.param(Answer(body=b'[1, 2]'), id="a-list"),
    pytest.param(Answer(body=b"x" * (2 * 1024 * 1024)), id="huge"),
]


@pytest.mark.parametrize("answer", BAD_LEADERBOARDS)
def test_a_bad_leaderboard_is_no_news(coordinator: FakeCoordinator, answer: Answer):
    from volunteer.core.seed_client import fetch_verified

    coordinator.answer("/v1/leaderboard", **answer.__dict__)
    with pytest.raises(CoordinatorError, match="no leaderboard from") as raised:
        fetch_verified(coordinator.url, "QmMe", timeout=5.0)
    assert "\n" not in str(raised.value)


def test_the_leaderboard_line_of_a_volunteer(coordinator: FakeCoordinator):
    from volunteer.core.seed_client import Verified, fetch_verified

    coordinator.answer("/v1/leaderboard", body=b'{"volunteers": 7, "rank": 2, "entries": '
                                                b'[{"peer_id": "QmMe", "forward_samples": 30, "backward_samples": 12}]}')
    assert fetch_verified(coordinator.url, "QmMe") == Verified(30, 12, 2, 7)
    coordinator.answer("/v1/leaderboard", body=b'{"volunteers": 7, "rank": null, "entries": []}')
    assert fetch_verified(coordinator.url, "QmMe") == Verified(0, 0, None, 7)
    coordinator.stop()
    with pytest.raises(CoordinatorError, match="no leaderboard from"):
        fetch_verified(coordinator.url, "QmMe", timeout=2.0)


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


def test_unbounded_manifest_file_is_not_read_to_the_end(tmp_path: Path):
    """``--experiment /dev/zero`` (or a FIFO that never ends) must stop at the size limit, not fill memory."""
    fifo = tmp_path / "experiment.json"
    os.mkfifo(fifo)
    written, limit = [0], 4 * MAX_BODY_BYTES  # the writer stops here, so a failing test stays small

    def writer() -> None:
        try:
            with open(fifo, "wb") as f:
                while written[0] < limit:
                    f.write(b" " * 65536)
                    written[0] += 65536
        except OSError:
            pass  # the reader stopped reading: what a bounded reader does

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with pytest.raises(ManifestError, match="more than the"):
            load(fifo)
    finally:
        if thread.is_alive():  # unblock a writer still waiting in open() or write()
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
    assert written[0] <= MAX_MANIFEST_BYTES + 4 * 65536


# --- nothing from the network (or disk) is unpickled or executed -----------------------------------

_UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Lines that could turn bytes into code: eval/exec, any pickle-family module, torch.load without
    ``weights_only=True``, numpy loads with pickles allowed, yaml.load."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where} imports {n}" for n in names if n.split(".")[0] in _UNPICKLERS]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and name in ("eval", "exec", "__import__"):
            found.append(f"{where} calls {name}()")
        elif owner in _UNPICKLERS and name in ("load", "loads", "Unpickler", "open"):
            found.append(f"{where} calls {owner}.{name}()")
        elif owner == "torch" and name == "load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{where} calls torch.load() without weights_only=True")
        elif owner in ("np", "numpy") and name == "load":
            allow = keywords.get("allow_pickle")
            if not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where} calls {owner}.load() without allow_pickle=False")
        elif owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
            found.append(f"{where} calls yaml.{name}()")
    return found


def test_the_scanner_finds_each_unsafe_pattern():
    source = "\n".join([
        "import pickle", "from dill import loads", "x = eval('1')", "exec('pass')",
        "torch.load(path)", "torch.load(path, weights_only=False)", "np.load(f)", "yaml.load(s)",
        "pickle.loads(b)", "model.eval()", "torch.load(path, map_location='cpu', weights_only=True)",
        "np.load(f, allow_pickle=False)", "re.compile('x')",
    ])
    lines = sorted(int(f.split(":")[1].split()[0]) for f in unsafe_calls(source))
    assert lines == [1, 2, 3, 4, 5, 6, 7, 8, 9], unsafe_calls(source)


def test_product_code_never_unpickles_or_executes_data():
    files = sorted(p for d in ("volunteer", "coordinator_seeds") for p in (REPO / d).rglob("*.py"))
    assert len(files) > 10
    found = [hit for path in files for hit in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert not found, "\n".join(found)


# --- malformed requests to a real volunteer, from a plain hivemind client ---------------------------

UID = "testlm_ffn0.1.3"  # pinned through node.json, so its checkpoints can be planted before the start
LIFETIME_BEFORE = Totals(forward_samples=1000, backward_samples=100, optimizer_steps=10)


@dataclass
class Served:
    home: Path
    child: Any
    event: dict
    expert: Any  # hivemind RemoteExpert
    max_batch_size: int
    planted: dict[str, bytes]  # the corrupt files planted before the start
    cache_before: dict[str, tuple[bytes, int]]


def _plant_state(home: Path) -> dict[str, bytes]:
    """node.json pins UID; its latest checkpoint is truncated (the previous one is whole); lifetime.json
    is truncated (its backup is whole). All must be survived without losing data."""
    (home / "state").mkdir(parents=True, exist_ok=True)
    (home / "state" / "node.json").write_text(json.dumps({"experiment": "test-lm", "uids": [UID]}))
    store = CheckpointStore(home / "data" / "checkpoints" / "test-lm")
    store.save(fresh_checkpoint(UID, 5))
    latest = store.save(fresh_checkpoint(UID, 9))
    truncated = latest.read_bytes()[: latest.stat().st_size // 2]
    latest.write_bytes(truncated)
    lifetime = LifetimeStore(home / "state" / "lifetime.json")
    lifetime.save(LIFETIME_BEFORE)
    lifetime.save(Totals(forward_samples=1001))  # the first one becomes lifetime.json.prev
    lifetime.path.write_bytes(b'{"forward_samples": 10')
    return {"checkpoint": truncated, "lifetime": b'{"forward_samples": 10'}


@pytest.fixture(scope="module")
def served(seed) -> Iterator[Served]:
    """One ``volunteer start --max-experts 1`` for every request below. Its coordinator is a proxy of the
    seed that answered once (seeding the cache) and is down by the time the volunteer starts, so the
    volunteer also proves it falls back to the cached manifest and peers."""
    from hivemind.moe import get_experts

    from coordinator_seeds.dispatch import shutdown_dht

    url, experiment = seed
    home = Path(tempfile.mkdtemp(prefix="vol-"))  # unix socket paths must stay under 107 bytes
    procs, dht, proxy = Processes(), None, FakeCoordinator()
    try:
        for path in ("/v1/experiment", "/v1/peers"):
            proxy.answer(path, body=httpx.get(f"{url}{path}", timeout=10).content)
        fetch_experiment(proxy.url, home / "cache", **FAST)
        cache_before = snapshot(home / "cache")
        proxy.stop()
        planted = _plant_state(home)
        child = procs.add(start_volunteer(home, proxy.url, "--max-experts", "1", "--log-interval", "60"))
        event = serving_event(child)
        dht = records.join_dht(experiment.manifest.dht_prefix, experiment.initial_peers, client_mode=True)
        expert = wait_for(lambda: get_experts(dht, [UID])[0], 30, f"{UID} in the DHT")
        yield Served(home, child, event, expert, event["plans"][0]["max_batch_size"], planted, cache_before)
    finally:
        proxy.stop()
        if dht is not None:
            shutdown_dht(dht)
        procs.stop_all()
        shutil.rmtree(home, ignore_errors=True)


def raw_call(served: Served, rpc: str, tensors: list, uid: str | None = None,
             timeout: float = 15.0) -> list[torch.Tensor]:
    """One rpc_forward/rpc_backward with exactly these tensors: hivemind's client-side checks bypassed."""
    from hivemind.compression import serialize_torch_tensor
    from hivemind.moe.client.expert import expert_backward, expert_forward
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.proto import runtime_pb2

    none = runtime_pb2.CompressionType.NONE
    serialized = [t if isinstance(t, runtime_pb2.Tensor) else serialize_torch_tensor(t, none) for t in tensors]
    plain = [t for t in tensors if isinstance(t, torch.Tensor)]
    call = expert_forward if rpc == "forward" else expert_backward
    future = RemoteExpertWorker.run_coroutine(call(uid or served.expert.uid, plain, serialized, served.expert.stub),
                                              return_future=True)
    try:
        return future.result(timeout)
    finally:
        future.cancel()  # a call left hanging must not outlive the test


def _proto(size: list[int], dtype: str, buffer: bytes):
    from hivemind.proto import runtime_pb2

    return runtime_pb2.Tensor(buffer=buffer, size=size, dtype=dtype, compression=runtime_pb2.CompressionType.NONE)


D = MANIFEST.d_model

# id, rpc, tensors(max_batch_size) -> list, uid override
REJECTED = [
    ("forward-last-dim-31", "forward", lambda m: [torch.randn(3, D - 1)], None),
    ("forward-rank-3-last-dim-1", "forward", lambda m: [torch.randn(3, D, 1)], None),
    ("forward-0-d-scalar", "forward", lambda m: [torch.tensor(1.0)], None),
    ("forward-float64", "forward", lambda m: [torch.randn(3, D, dtype=torch.float64)], None),
    ("forward-int64", "forward", lambda m: [torch.ones(3, D, dtype=torch.int64)], None),
    ("forward-over-max-batch-size", "forward", lambda m: [torch.randn(m + 1, D)], None),
    ("forward-no-tensors", "forward", lambda m: [], None),
    ("forward-shape-claims-1e9-rows", "forward", lambda m: [_proto([10**9, D], "float32", b"\x00" * 12)], None),
    ("forward-object-dtype", "forward", lambda m: [_proto([3, D], "object", b"\x00" * 8 * 3 * D)], None),
    ("forward-unknown-uid", "forward", lambda m: [torch.randn(3, D)], "testlm_ffn9.9.9"),
    ("backward-last-dim-31", "backward", lambda m: [torch.randn(3, D - 1), torch.randn(3, D - 1)], None),
    ("backward-grad-batch-differs", "backward", lambda m: [torch.randn(3, D), torch.randn(4, D)], None),
    ("backward-float64", "backward",
     lambda m: [torch.randn(3, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)], None),
    ("backward-no-grad", "backward", lambda m: [torch.randn(3, D)], None),
]


@pytest.mark.integration
def test_volunteer_starts_from_the_cache_and_survives_corrupt_state(served: Served):
    output = "".join(served.child.output)
    assert "unreachable after 4 attempts (connection refused)" in output and "using the experiment cached" in output
    assert served.event["uids"] == [UID] and served.event["restored"] == [UID]
    # the cached experiment is untouched (the cache dir also holds other things, such as throughput figures)
    cached = snapshot(served.home / "cache")
    assert {name: cached.get(name) for name in served.cache_before} == served.cache_before

    checkpoints = served.home / "data" / "checkpoints" / "test-lm"
    [aside] = [p for p in checkpoints.iterdir() if p.name.startswith(f"{UID}.pt.corrupt-")]
    assert aside.read_bytes() == served.planted["checkpoint"]
    [aside] = [p for p in (served.home / "state").iterdir() if p.name.startswith("lifetime.json.corrupt-")]
    assert aside.read_bytes() == served.planted["lifetime"]

    figures = status(served.home)
    [mine] = [e["stats"] for e in figures["experts"]]
    assert mine["optimizer_steps"] == 5, "restored from the whole previous checkpoint, not the truncated latest"
    assert figures["lifetime"]["forward_samples"] == LIFETIME_BEFORE.forward_samples, "counted on from the backup"


@pytest.mark.integration
@pytest.mark.parametrize("rpc, make, uid", [pytest.param(r, t, u, id=i) for i, r, t, u in REJECTED])
def test_malformed_request_is_rejected(served: Served, rpc: str, make, uid: str | None):
    from hivemind.p2p import P2PHandlerError

    with pytest.raises(P2PHandlerError):
        raw_call(served, rpc, make(served.max_batch_size), uid=uid)
    assert served.child.proc.poll() is None, served.child.tail(20)


@pytest.mark.integration
def test_after_the_bad_requests_it_still_serves_and_counts_only_good_ones(served: Served):
    before = status(served.home)
    assert before["session"]["forward_samples"] == 0 and before["session"]["backward_samples"] == 0, \
        "a rejected request was counted"
    with torch.no_grad():
        (out,) = raw_call(served, "forward", [torch.randn(5, D)])
    assert out.shape == (5, D) and torch.isfinite(out).all()
    x = torch.randn(7, D, requires_grad=True)
    served.expert(x).sum().backward()  # the plain hivemind client, autograd and all
    assert x.grad is not None and x.grad.shape == (7, D) and torch.isfinite(x.grad).all()

    figures = status(served.home)
    assert figures["state"] == "serving" and served.child.proc.poll() is None
    [mine] = [e["stats"] for e in figures["experts"]]
    assert (mine["forward_samples"], mine["backward_samples"]) == (5 + 7, 7)
    assert (mine["forward_batches"], mine["backward_batches"]) == (2, 1)
    assert figures["session"]["forward_samples"] == 12 and figures["session"]["backward_samples"] == 7
    assert figures["lifetime"]["forward_samples"] == LIFETIME_BEFORE.forward_samples + 12


# --- requests a volunteer must refuse: hivemind checks none of this (serving.CheckedTaskPool does) -----

@pytest.mark.integration
@pytest.mark.parametrize("tensors", [
    pytest.param(lambda: [torch.randn(D)], id="forward-rank-1"),
    pytest.param(lambda: [torch.randn(3, 4, D)], id="forward-rank-3"),
    pytest.param(lambda: [torch.full((3, D), float("nan"))], id="forward-nan"),
    pytest.param(lambda: [torch.full((3, D), float("inf"))], id="forward-inf"),
])
def test_malformed_forward_is_refused(served: Served, tensors):
    from hivemind.p2p import P2PHandlerError

    with pytest.raises(P2PHandlerError):
        raw_call(served, "forward", tensors())


@pytest.mark.integration
def test_nan_gradients_are_refused_and_do_not_poison_the_expert(served: Served):
    from hivemind.p2p import P2PHandlerError

    try:
        with pytest.raises(P2PHandlerError):
            raw_call(served, "backward", [torch.randn(3, D), torch.full((3, D), float("nan"))])
    finally:
        (out,) = raw_call(served, "forward", [torch.randn(2, D)])
        poisoned = not torch.isfinite(out).all()
    assert not poisoned


@pytest.mark.integration
def test_empty_batch_is_refused_at_once(served: Served):
    from hivemind.p2p import P2PHandlerError

    with pytest.raises(P2PHandlerError):
        raw_call(served, "forward", [torch.randn(0, D)], timeout=3)


@pytest.mark.integration
def test_a_burst_mixing_bad_and_good_requests_does_not_kill_the_expert(served: Served):
    """A wrong-shaped task batched with good ones once made torch.cat kill the pool's loop."""
    from hivemind.compression import serialize_torch_tensor
    from hivemind.moe.client.expert import expert_forward
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.proto import runtime_pb2

    def send(x: torch.Tensor):
        serialized = [serialize_torch_tensor(x, runtime_pb2.CompressionType.NONE)]
        return RemoteExpertWorker.run_coroutine(expert_forward(UID, [x], serialized, served.expert.stub),
                                                return_future=True)

    futures = [send(torch.randn(3, D if i % 2 else D - 1)) for i in range(40)]
    done, pending = concurrent.futures.wait(futures, timeout=8)
    for future in pending:
        future.cancel()
    assert not pending, f"{len(pending)} of 40 requests unanswered after 8 s"
    good = [f.result() for i, f in enumerate(futures) if i % 2]
    assert all(out[0].shape == (3, D) for out in good)
    assert all(f.exception() is not None for i, f in enumerate(futures) if not i % 2)
    (out,) = raw_call(served, "forward", [torch.randn(2, D)], timeout=5)
    assert out.shape == (2, D)
