"""The event log: what a person sees of a volunteer's life, on the dashboard, in its log file, at exit."""

from __future__ import annotations

import io
import json
import logging

import pytest

from volunteer.core.logs import EventLog


def test_events_before_the_dashboard_wait_and_are_replayed_when_it_attaches() -> None:
    """Issue 15.6: the panel said "none yet" after joined, expert_restored and serving."""
    events, panel = EventLog(), []
    events.emit("joined", "joined the DHT")
    events.emit("serving", "serving 2 experts")
    events.attach(panel.append)
    events.emit("paused", "paused: by the user")
    assert panel == ["joined the DHT", "serving 2 experts", "paused: by the user"]
    events.detach()
    events.emit("resumed", "resumed")
    assert panel[-1] == "paused: by the user"


def test_the_backlog_is_bounded() -> None:
    events, panel = EventLog(), []
    for i in range(EventLog.BACKLOG + 10):
        events.emit("peer_joined", f"peer {i}")
    events.attach(panel.append)
    assert len(panel) == EventLog.BACKLOG and panel[-1] == f"peer {EventLog.BACKLOG + 9}"


def test_every_event_is_a_log_record_too_so_the_log_file_keeps_it(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 15.6: state/volunteer.log lacked paused, resumed, draining and stopped under the dashboard."""
    events = EventLog()
    events.attach(lambda line: None)
    with caplog.at_level(logging.INFO, logger="volunteer.events"):
        for event in ("paused", "resumed", "draining", "stopped"):
            events.emit(event, f"{event} now")
    assert [r.getMessage() for r in caplog.records] == ["paused now", "resumed now", "draining now", "stopped now"]


def test_headless_events_are_json_lines_only(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    events = EventLog(stream)
    with caplog.at_level(logging.INFO, logger="volunteer.events"):
        events.emit("stopped", "stopped (SIGTERM): left the swarm in 1.0 s", reason="SIGTERM")
    line = json.loads(stream.getvalue())
    assert line["event"] == "stopped" and line["reason"] == "SIGTERM" and caplog.records == []
    assert events.closing == "stopped (SIGTERM): left the swarm in 1.0 s"
