"""What a new user meets in their first hour (issue 15): help that reads at 80 columns, a status that
answers at once, commands whose every option says what it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from volunteer.demo import human_line

STATUS_WITH_NOTHING_RUNNING = """
import sys
from volunteer.cli import main
sys.argv = ["volunteer", "status"]
try:
    main()
except SystemExit as e:
    code = e.code
print("heavy:", sorted(m for m in ("torch", "hivemind") if m in sys.modules), "code:", code)
"""


def test_status_with_nothing_running_loads_neither_torch_nor_hivemind(tmp_path: Path) -> None:
    """It took 2-4 s only to import them for an error class it could not have met."""
    env = {**os.environ, "VOLUNTEER_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", STATUS_WITH_NOTHING_RUNNING], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "heavy: [] code: 2", done.stdout + done.stderr
    assert done.stderr.startswith("error: no volunteer is running"), done.stderr


@pytest.mark.parametrize("argv", [
    ["volunteer.cli", "--help"], ["volunteer.cli", "start", "--help"], ["volunteer.cli", "hardware", "--help"],
    ["volunteer.cli", "config", "--help"], ["coordinator_seeds.cli", "--help"], ["coordinator_seeds.cli", "run", "--help"],
    ["coordinator_seeds.cli", "train", "--help"],
])
def test_help_at_80_columns_shows_whole_option_names_and_help_for_each(argv: list[str]) -> None:
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "<bool>" not in text and "…" not in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    # every option line carries words after its name (a help text), or continues one
    options = [line for line in text.splitlines() if line.startswith("  -")]
    bare = [line for line in options if len(line.split(maxsplit=1)) == 1
            or line.split(maxsplit=1)[1].startswith("<") and len(line.split()) == 2]
    assert not bare, bare


SERVING_EVENT = {"event": "serving", "time": 1.0, "message": "serving 4 experts of demo-lm on cpu as QmPeer",
                 "peer_id": "QmPeer", "uids": [f"ffn0.0.{i}" for i in range(400)], "pids": {"dht": 1}}


@pytest.mark.parametrize("line, shown", [
    (json.dumps(SERVING_EVENT), "serving 4 experts of demo-lm on cpu as QmPeer"),
    (json.dumps({"event": "stats", "time": 1.0, "session": {}}), None),
    (json.dumps({"event": "log", "level": "INFO", "logger": "hivemind", "message": "chatter"}), None),
    (json.dumps({"event": "log", "level": "WARNING", "logger": "x", "message": "disk almost full"}),
     "warning: disk almost full"),
    ("Traceback (most recent call last):\n", "Traceback (most recent call last):"),
    ("[1, 2]\n", "[1, 2]"),
])
def test_the_demo_shows_a_person_each_json_lines_message(line: str, shown: str | None) -> None:
    """Issue 15.5: one raw `serving` event was ~3,000 characters, ~20 wrapped lines."""
    assert human_line(line) == shown


def test_the_demo_cuts_long_lines_to_the_terminal() -> None:
    long = json.dumps({"event": "peer_joined", "message": "x" * 500})
    assert human_line(long, 60) == "x" * 59 + "…"


@pytest.mark.integration
def test_the_demo_trains_and_reads_as_lines_for_people(short_home: Path) -> None:
    """The README's main command, end to end, as a person sees it at 100 columns."""
    # short_home: the demo's volunteers keep their control sockets below it (a unix socket path has 107 bytes)
    env = {**os.environ, "VOLUNTEER_HOME": str(short_home), "COLUMNS": "100", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "volunteer.cli", "demo", "--steps", "10", "--fresh"], env=env,
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    volunteer = [line for line in lines if line.startswith("[volunteer0] ")]
    assert volunteer and not any(line.startswith('[volunteer0] {"') for line in volunteer), volunteer[:5]
    assert all(len(line) <= 100 for line in volunteer), max(volunteer, key=len)
    assert any("serving" in line for line in volunteer), volunteer
    assert any(line.startswith("[trainer] ") and "step 10 loss" in line and "experts alive" in line
               for line in lines), lines[-20:]
    assert (short_home / "data" / "demo").is_dir()


@pytest.mark.parametrize("raw, said", [
    ("Daemon failed to start: 2026/12/03 12:38:26 failed to connect to bootstrap peers",
     "could not reach any initial peer (/ip4/1.2.3.4/tcp/1/p2p/QmA, /ip4/1.2.3.5/tcp/1/p2p/QmB and 1 more): is the"),
    ("Daemon failed to start: 2026/12/03 12:38:26 failed to listen on any addresses",
     "the p2p daemon did not start: failed to listen on any addresses"),
    ("", "the p2p daemon did not start: no reason given"),
])
def test_the_p2p_daemons_failures_read_as_one_line_without_its_log_prefix(raw: str, said: str) -> None:
    """Issue 15.8: `error: Daemon failed to start: 2026/12/03 ... failed to ...` after seconds."""
    from volunteer.core.records import daemon_failure

    peers = ["/ip4/1.2.3.4/tcp/1/p2p/QmA", "/ip4/1.2.3.5/tcp/1/p2p/QmB", "/ip4/1.2.3.6/tcp/1/p2p/QmC"]
    text = daemon_failure(raw, peers)
    assert text.startswith(said) and "\n" not in text and "2026/" not in text


@pytest.mark.integration
def test_a_volunteer_started_without_peers_says_it_is_a_swarm_of_one(short_home: Path) -> None:
    """Issue 15.9: `volunteer start --experiment FILE` without peers joined nothing and served, silently."""
    from tests.conftest import TEST_MANIFEST
    from volunteer.core.harness import ChildProcess

    manifest = short_home / "test-lm.toml"
    short_home.mkdir(parents=True, exist_ok=True)
    manifest.write_text(TEST_MANIFEST)
    alone = ChildProcess("alone", [sys.executable, "-m", "volunteer.cli", "start", "--headless", "--experiment",
                                   str(manifest), "--host", "127.0.0.1", "--max-experts", "1"],
                         env={"VOLUNTEER_HOME": str(short_home)})
    try:
        line = json.loads(alone.wait_for_line(r'"event": "alone"', timeout=120).string)
        assert "no trainer can reach it unless started with --initial-peers /ip4/127.0.0.1/tcp/" in line["message"]
        assert line["maddrs"] and all("/p2p/" in m for m in line["maddrs"])
    finally:
        assert alone.stop() == 0
