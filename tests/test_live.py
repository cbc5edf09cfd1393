"""A running volunteer's live figures: counters against a plain hivemind client, the headless JSON
lines, ``volunteer status | stop`` over the control socket, lifetime totals across a restart, and the
real dashboard driven in tmux.

One seed keeps the DHT (and the volunteer records) alive while volunteers come and go.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hivemind.moe import get_experts

from tests.conftest import Processes, cli, json_lines, serving_event, status, wait_for
from volunteer.core import records
from volunteer.core.harness import start_volunteer

pytestmark = pytest.mark.integration


def send(dht, uid: str, d_model: int, forward_only: list[int], with_backward: list[int]) -> None:
    """Calls one after another, so the server cannot merge them into fewer batches."""
    [expert] = get_experts(dht, [uid])
    assert expert is not None, f"{uid} is not in the DHT"
    for n in forward_only:
        with torch.no_grad():
            expert(torch.randn(n, d_model))
    for n in with_backward:
        x = torch.randn(n, d_model, requires_grad=True)
        expert(x).sum().backward()


def expert_stats(figures: dict, uid: str) -> dict:
    return next(e["stats"] for e in figures["experts"] if e["stats"]["uid"] == uid)


def test_counters_status_headless_lines_and_lifetime_across_restart(seed, client, short_home, processes: Processes):
    url, experiment = seed
    d_model = experiment.manifest.d_model
    args = ("--max-experts", "2", "--log-interval", "1")
    first = processes.add(start_volunteer(short_home, url, *args, name="first"))
    serving = serving_event(first)
    uids = serving["uids"]
    uid, idle = uids

    # the control socket is owner-only, in a private directory
    sock = short_home / "runtime" / "volunteer.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700

    send(client, uid, d_model, forward_only=[3, 5], with_backward=[7, 7])
    figures = status(short_home)
    mine = expert_stats(figures, uid)
    assert (mine["forward_samples"], mine["backward_samples"]) == (3 + 5 + 7 + 7, 7 + 7)
    assert (mine["forward_batches"], mine["backward_batches"], mine["optimizer_steps"]) == (4, 2, 2)
    assert mine["busy_seconds"] > 0 and mine["last_request"] is not None
    assert expert_stats(figures, idle)["forward_samples"] == 0
    assert figures["session"]["forward_samples"] == 22 and figures["session"]["backward_samples"] == 14
    assert figures["session"]["flops"] == pytest.approx(mine["params"] * (2 * 22 + 6 * 14))
    assert figures["state"] == "serving" and figures["peer_id"] == serving["peer_id"]

    # the headless JSON lines carry the same counters
    def counted_line():
        stats = [line for line in json_lines(first) if line["event"] == "stats"]
        return stats and stats[-1]["session"]["forward_samples"] == 22 and stats[-1]
    line = wait_for(counted_line, 10, "a stats line with the requests counted")
    assert expert_stats(line, uid)["backward_samples"] == 14
    assert line["telemetry"]["cpu"]["cores"] >= 1
    assert all(isinstance(e["event"], str) for e in json_lines(first))

    stopped = cli(short_home, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("stopped in ")
    assert first.proc.wait(timeout=30) == 0
    assert not sock.exists()
    saved = json.loads((short_home / "state" / "lifetime.json").read_text())
    assert (saved["forward_samples"], saved["backward_samples"]) == (22, 14)

    # a restart serves the same experts and counts on from the lifetime totals
    second = processes.add(start_volunteer(short_home, url, *args, name="second"))
    again = serving_event(second)
    assert sorted(again["uids"]) == sorted(uids) and sorted(again["restored"]) == sorted(uids)
    send(client, uid, d_model, forward_only=[4], with_backward=[])
    figures = status(short_home)
    assert figures["session"]["forward_samples"] == 4
    assert figures["lifetime"]["forward_samples"] == 26 and figures["lifetime"]["backward_samples"] == 14
    assert expert_stats(figures, uid)["optimizer_steps"] == 2  # restored from the checkpoint
    assert cli(short_home, "stop").returncode == 0
    assert second.proc.wait(timeout=30) == 0


def test_status_and_stop_without_a_running_client(short_home: Path):
    for command in ("status", "stop"):
        result = cli(short_home, command)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: no volunteer is running (no control socket at {short_home / 'runtime' / 'volunteer.sock'})"
        ]
    # a socket file nobody listens on: what a killed client leaves behind
    path = short_home / "runtime" / "volunteer.sock"
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    result = cli(short_home, "status")
    assert result.returncode == 2
    assert "is stale" in result.stderr and "Traceback" not in result.stderr


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=10, check=True).stdout


class Terminal:
    """A volunteer's dashboard in a real terminal: a detached tmux session, killed at the end."""

    def __init__(self, home: Path, url: str):
        self.home, self.session = home, f"volunteer-test-{os.getpid()}-{home.name}"
        self.exit_file = home / "exit-code"
        command = (f"VOLUNTEER_HOME={home} {sys.executable} -m volunteer.cli start --coordinator {url} "
                   f"--host 127.0.0.1 --max-experts 2; echo $? > {self.exit_file}; sleep 120")  # the screen stays
        _tmux("new-session", "-d", "-s", self.session, "-x", "140", "-y", "45", command)

    def screen(self) -> str:
        return _tmux("capture-pane", "-p", "-t", self.session)

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True, timeout=10)
        lock = self.home / "state" / "volunteer.lock"
        owner = json.loads(lock.read_text() or "{}") if lock.exists() else {}
        for group in (owner.get("pgid"), owner.get("workers")):
            if isinstance(group, int) and group > 1:  # whatever a failed test left behind
                try:
                    os.killpg(group, 9)
                except ProcessLookupError:
                    pass


@pytest.fixture
def terminal(seed, short_home: Path) -> Iterator[Terminal]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    term = Terminal(short_home, seed[0])
    try:
        wait_for(lambda: "serving" in term.screen() and "testlm_ffn0" in term.screen(), 150,
                 "the dashboard to show its experts")
        yield term
    finally:
        term.close()


def test_dashboard_in_a_real_terminal(seed, client, short_home: Path, terminal: Terminal):
    """Start the TUI in tmux, see its panels fill with real numbers, press q, see it drain and leave."""
    _url, experiment = seed
    figures = status(short_home)
    uid = figures["experts"][0]["stats"]["uid"]
    peer_id = figures["peer_id"]
    send(client, uid, experiment.manifest.d_model, forward_only=[], with_backward=[9] * 20)
    text = wait_for(lambda: (s := terminal.screen()) and "360" in s and s, 15,
                    "the dashboard to count 9 x 20 x 2 samples")
    for panel in ("test-lm", uid, "swarm", "lifetime", "hardware", "experts", "samples/s"):
        assert panel in text, text
    assert any(prefix in text for prefix in ("CPU", "GPU")), text
    # the events of the start (joined, serving), emitted before the dashboard ran, are in its panel
    assert "none yet" not in text and "serving 2 experts" in text, text

    _tmux("send-keys", "-t", terminal.session, "q")
    exit_file = terminal.exit_file
    code = wait_for(lambda: exit_file.exists() and exit_file.read_text().strip(), 60, "the client to exit")
    assert code == "0", terminal.screen()  # an abort at exit shows its reason on the screen
    prefix = experiment.manifest.dht_prefix
    wait_for(lambda: all(r.peer_id != peer_id for r in records.read_volunteers(client, prefix)), 15,
             "the swarm to notice the volunteer left")
    # a closing line on the terminal once the dashboard is gone: why, how long the drain took, the totals
    closing = terminal.screen()
    assert "stopped (q pressed): left the swarm in" in closing and "this session served " in closing, closing
    # and the log file has the moments the dashboard showed, down to the end
    log = (short_home / "state" / "volunteer.log").read_text()
    for moment in ("joined", "serving 2 experts", "draining", "stopped (q pressed)"):
        assert moment in log, log[-3000:]


def test_closing_the_terminal_drains_the_client(seed, client, short_home: Path, terminal: Terminal):
    """SIGHUP (ssh dropped, terminal closed) leaves as cleanly as SIGTERM: checkpoints, stats, no orphans."""
    _url, experiment = seed
    figures = status(short_home)
    owner = json.loads((short_home / "state" / "volunteer.lock").read_text())
    subprocess.run(["tmux", "kill-session", "-t", terminal.session], capture_output=True, timeout=10)
    assert owner["workers"] != owner["pgid"]
    wait_for(lambda: not _group_alive(owner["pgid"]) and not _group_alive(owner["workers"]), 60,
             "the client and all its processes to exit")
    checkpoints = short_home / "data" / "checkpoints" / experiment.manifest.name
    assert {f"{e['stats']['uid']}.pt" for e in figures["experts"]} <= {p.name for p in checkpoints.iterdir()}
    assert json.loads((short_home / "state" / "lifetime.json").read_text())["uptime_seconds"] > 0
    prefix = experiment.manifest.dht_prefix
    wait_for(lambda: all(r.peer_id != figures["peer_id"] for r in records.read_volunteers(client, prefix)), 15,
             "the swarm to notice the volunteer left")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_monitor_shows_a_headless_client_and_leaves_it_running(seed, short_home: Path, processes):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    url, _experiment = seed
    headless = processes.add(start_volunteer(short_home, url, "--max-experts", "2", name="headless"))
    uids = serving_event(headless)["uids"]
    session, exit_file = f"volunteer-monitor-{os.getpid()}", short_home / "monitor-exit"
    _tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "45",
          f"VOLUNTEER_HOME={short_home} {sys.executable} -m volunteer.cli monitor; echo $? > {exit_file}")
    try:
        screen = lambda: _tmux("capture-pane", "-p", "-t", session)  # noqa: E731
        wait_for(lambda: all(uid in screen() for uid in uids) and "serving" in screen(), 30,
                 "the monitor to show the client's experts")
        _tmux("send-keys", "-t", session, "q")
        wait_for(lambda: exit_file.exists() and exit_file.read_text().strip() == "0", 15, "the monitor to quit")
        assert headless.proc.poll() is None, "quitting the monitor must leave the client running"
        assert status(short_home)["state"] == "serving"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=10)
