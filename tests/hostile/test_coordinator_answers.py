"""A coordinator that misbehaves: retries, backoff, the cache, random answers, a bad leaderboard."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import wait_for
from tests.fakes import Answer, FakeCoordinator, json_values
from tests.hostile.common import (
    FAST,
    MANIFEST,
    PEER,
    PEERS_BODY,
    assert_one_line,
    assert_untouched,
    new_coordinator,
    snapshot,
)
from volunteer.core.seed_client import (
    MAX_BODY_BYTES,
    CoordinatorError,
    Experiment,
    cache_path,
    fetch_experiment,
)

SLOW_ANSWER = 1.5  # seconds a "slow" coordinator sleeps: longer than FAST's timeout


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
    fake = new_coordinator()
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
