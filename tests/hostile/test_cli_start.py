"""`volunteer start` end to end on bad input: exit 2, one ``error:`` line, the home untouched."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import TEST_MANIFEST, VOLUNTEER, one_line_error, run
from tests.fakes import Answer, FakeCoordinator
from tests.hostile.common import (
    HUGE_HTTP,
    MANIFEST,
    PEER,
    assert_untouched,
    delete_at,
    mutated,
    seed_home,
    set_at,
    snapshot,
)
from volunteer.core.manifest import MAX_MANIFEST_BYTES
from volunteer.core.seed_client import MAX_BODY_BYTES

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


def _garbage_peers(peers: str, seeded: bool = True, joins: bool = False):
    """``joins``: the peers parse, so the client goes as far as the DHT: by then it has made its record
    key and its lock file, so what is watched is what must never be lost, the checkpoints."""
    def prepare(home: Path, tmp: Path, fake: FakeCoordinator) -> CliCase:
        if seeded:
            seed_home(home)
        else:
            (home / "data" / "checkpoints").mkdir(parents=True, exist_ok=True)
        argv = ["start", "--experiment", _file(tmp, MANIFEST.to_json().encode()), "--initial-peers", peers]
        return CliCase(argv, home, home / "data" / "checkpoints" if joins else home)
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
    ("file-negative-size", _from_file(mutated(set_at(("expert_types", 0, "d_hidden"), -64)))),
    ("file-over-256KiB", _from_file(TEST_MANIFEST.encode() + b"#" * (MAX_MANIFEST_BYTES + 1) + b"\n", ".toml")),
    ("url-missing-field", _from_url(Answer(body=mutated(delete_at(("d_model",)))))),
    ("url-body-over-1MiB", _from_url(Answer(body=HUGE_HTTP))),
    ("url-html", _from_url(Answer(body=b"<html>Welcome to nginx</html>", content_type="text/html"))),
    ("url-http-500", _from_url(Answer(500, b"oops", "text/plain"))),
    # issue 15.8: these reached the p2p daemon, which failed 3-9 s later with a Go log line in the error
    ("peers-garbage", _garbage_peers("garbage")),
    ("peers-bad-peer-id", _garbage_peers("/ip4/1.2.3.4/tcp/1/p2p/QmSeed")),
    # a home without seed_home's made-up identity key, which the daemon would refuse first (next case)
    ("peers-unreachable", _garbage_peers("/ip4/127.0.0.1/tcp/9/p2p/QmXrPbzKT1gnMfAVgLY6ANgk2xKHzHBCMXjVEC5oUJsvSh",
                                         seeded=False, joins=True)),
    ("identity-unreadable", _garbage_peers("/ip4/127.0.0.1/tcp/9/p2p/QmXrPbzKT1gnMfAVgLY6ANgk2xKHzHBCMXjVEC5oUJsvSh",
                                           joins=True)),
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
    "peers-garbage": r"^error: initial peers: an invalid peer list: 'garbage' is not a multiaddr .*$",
    "peers-bad-peer-id": r"^error: initial peers: an invalid peer list: '/ip4/1.2.3.4/tcp/1/p2p/QmSeed' is not a "
                         r"valid multiaddr \(.*\)$",
    "peers-unreachable": r"^error: could not reach any initial peer \(/ip4/127\.0\.0\.1/tcp/9/p2p/Qm\w+\): is the "
                         r"swarm's seed running and reachable from here\? .*$",
    "identity-unreadable": r"^error: identity file .*/data/identity\.key is unreadable \(.*\); move it aside to join "
                           r"with a new peer id$",
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
