"""The real console entries, run as subprocesses: exit codes and one-line errors a person can act on.

Everything listens on 127.0.0.1 only; every child is bounded by a timeout and stopped with its group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from tests.conftest import TEST_MANIFEST, Processes, one_line_error, run
from volunteer import __version__
from volunteer.cli import _given_flags, _with_setting_options, app
from volunteer.config.settings import KEYS
from volunteer.config.sources import resolve_settings
from volunteer.core.harness import free_port, start_seed, start_volunteer

VOLUNTEER = [sys.executable, "-m", "volunteer.cli"]
SEED = [sys.executable, "-m", "coordinator_seeds.cli"]
SERVING = r"\"message\": \"serving (\d+) experts of test-lm on cpu as (\S+?)(?:, \d+ restored from checkpoints)?: ([^\"]+)\""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture(scope="module")
def seed_url(tmp_path_factory) -> Iterator[str]:
    """One real coordinator seed for the tests that need a swarm (starting it costs seconds on 2 cores)."""
    root = tmp_path_factory.mktemp("cli-seed")
    manifest = root / "test-lm.toml"
    manifest.write_text(TEST_MANIFEST)
    procs = Processes()
    seed, url = start_seed(experiment=manifest, home=root)
    procs.add(seed)
    try:
        yield url
    finally:
        procs.stop_all()


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 held by a listening socket for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- version and help ----------------------------------------------------------------------------


def test_version(home: Path):
    result = run([*VOLUNTEER, "--version"], home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"hivemind-volunteer {__version__}"


@pytest.mark.parametrize(
    "argv, expected",
    [
        pytest.param([*VOLUNTEER, "--help"], ["start", "hardware", "demo"], id="volunteer"),
        pytest.param([*VOLUNTEER, "start", "--help"], ["--coordinator", "--experiment", "--max-memory"], id="start"),
        pytest.param([*VOLUNTEER, "hardware", "--help"], ["--json", "--max-memory"], id="hardware"),
        pytest.param([*VOLUNTEER, "demo", "--help"], ["--volunteers", "--steps"], id="demo"),
        pytest.param([*SEED, "--help"], ["run", "train"], id="seed"),
        pytest.param([*SEED, "run", "--help"], ["--http-port", "--experiment"], id="seed-run"),
        pytest.param([*SEED, "train", "--help"], ["--coordinator", "--steps", "--audit-rate"], id="seed-train"),
    ],
)
def test_help(home: Path, argv: list[str], expected: list[str]):
    result = run(argv, home)
    assert result.returncode == 0, result.stderr
    for word in expected:
        assert word in result.stdout, f"{word} missing from {argv} --help"


def test_train_refuses_an_audit_rate_outside_0_to_1(home: Path):
    result = run([*SEED, "train", "--initial-peers", "/ip4/127.0.0.1/tcp/9", "--audit-rate", "2"], home)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].endswith("--audit-rate must be between 0 and 1, got 2.0"), \
        result.stderr


def test_start_has_one_option_per_setting_with_its_spellings_and_help():
    start = typer.main.get_command(app).commands["start"]
    options = {param.name: param for param in start.params}
    assert list(options)[:len(KEYS)] == [key.name for key in KEYS]
    for key in KEYS:
        assert (*options[key.name].opts, *options[key.name].secondary_opts) == key.flags
    assert all(param.help for param in start.params), "every option of start has help"


def test_start_help_keeps_every_option_name_whole_at_80_columns(home: Path):
    result = run([*VOLUNTEER, "start", "--help"], home, columns=80)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout and max(map(len, result.stdout.splitlines())) <= 80
    for flag in [flag for key in KEYS for flag in key.flags] + ["--verbose"]:
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", result.stdout), f"{flag} is cut or missing"


def probe_flags(argv: list[str]) -> dict:
    """The flags ``start`` would hand the config engine for this command line, without starting anything."""
    probe, given = typer.Typer(), {}

    @probe.command()
    @_with_setting_options()
    def settings_only(ctx: typer.Context, **options) -> None:
        given.update(_given_flags(ctx, options))

    result = CliRunner().invoke(probe, argv)
    assert result.exit_code == 0, result.output
    return given


def test_only_flags_on_the_command_line_reach_the_config_engine(tmp_path: Path):
    assert probe_flags([]) == {}  # the defaults --help shows must not hide the environment or the file
    given = probe_flags(["--no-stats", "--dashboard", "--port", "7", "--max-memory", "8GiB", "--experiment", "e.toml",
                         "--initial-peers", "a,b", "--initial-peers", "c", "--checkpoint-interval", "5"])
    assert set(given) == {"stats", "dashboard", "port", "max_memory", "experiment_file", "initial_peers",
                          "checkpoint_interval"}
    resolved = resolve_settings(given, {"VOLUNTEER_POWER": "light", "VOLUNTEER_STATS": "yes"}, tmp_path / "none.toml")
    settings = resolved.settings
    assert (settings.stats, settings.dashboard, settings.port, settings.max_memory) == (False, True, 7, 8 * 2**30)
    assert settings.experiment_file == Path("e.toml") and settings.initial_peers == ("a", "b", "c")
    assert settings.checkpoint_interval == 5.0 and settings.power == "light"
    assert resolved.sources["stats"] == "flag --stats" and resolved.sources["power"] == "env VOLUNTEER_POWER"


# a value other than the default for every setting that takes one, as it is typed on the command line
ON_THE_COMMAND_LINE = {
    "coordinator": "http://127.0.0.1:1", "initial_peers": "a,b", "experiment_file": "e.toml", "host": "127.0.0.1",
    "port": "7", "announce_host": "203.0.113.7", "device": "cpu", "gpus": "0,2", "max_memory": "0.5",
    "max_experts": "3", "num_handlers": "4", "checkpoint_interval": "5", "announce_interval": "6",
    "log_interval": "7", "cpu_threads": "8", "power": "light", "serving": "hivemind", "max_temp": "70",
    "run_hours": "22-08",
    "rebalance_period": "0", "startup_timeout": "45",
}


@pytest.mark.parametrize("key", KEYS, ids=lambda key: key.name)
def test_each_option_sets_its_own_setting_and_is_named_as_its_source(tmp_path: Path, key):
    switch = key.flags[-1] if key.default else key.flag  # --no-stats, --pause-on-gpu-use, --headless
    argv = [key.flag, ON_THE_COMMAND_LINE[key.name]] if key.name in ON_THE_COMMAND_LINE else [switch]
    resolved = resolve_settings(probe_flags(argv), {}, tmp_path / "none.toml")
    assert getattr(resolved.settings, key.name) != key.default
    assert [name for name, source in resolved.sources.items() if source != "default"] == [key.name]
    assert resolved.sources[key.name] == f"flag {key.flag}"


# --- volunteer start: bad input ------------------------------------------------------------------


def test_start_without_an_experiment_says_what_to_pass(home: Path):
    result = run([*VOLUNTEER, "start"], home)
    assert result.returncode == 2
    line = one_line_error(result, only=True)
    assert "--coordinator" in line and "volunteer demo" in line


def test_start_with_a_bad_manifest_names_the_field(home: Path, tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TEST_MANIFEST.replace('block = "residual_ffn"', 'block = "transformer"'))
    result = run([*VOLUNTEER, "start", "--experiment", str(bad), "--host", "127.0.0.1",
                  "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmXrPbzKT1gnMfAVgLY6ANgk2xKHzHBCMXjVEC5oUJsvSh"], home)
    assert result.returncode == 2
    line = one_line_error(result, only=True)
    assert "expert_types[0].block" in line and "transformer" in line
    assert not (home / "data" / "identity.key").exists(), "nothing may start before the manifest is valid"


def test_start_on_gpus_this_box_lacks_fails_before_joining(home: Path, tmp_path: Path):
    manifest = tmp_path / "m.toml"
    manifest.write_text(TEST_MANIFEST)
    result = run([*VOLUNTEER, "start", "--experiment", str(manifest), "--host", "127.0.0.1", "--gpus", "1",
                  "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmXrPbzKT1gnMfAVgLY6ANgk2xKHzHBCMXjVEC5oUJsvSh"], home)
    assert result.returncode == 2
    assert "--gpus '1': no GPU was found" in one_line_error(result, only=True)
    assert not (home / "data" / "identity.key").exists(), "a bad device choice must fail before joining"


def test_start_with_an_unreachable_coordinator_and_no_cache(home: Path):
    url = f"http://127.0.0.1:{free_port()}"  # bound and closed again: nothing listens there
    started = time.monotonic()
    result = run([*VOLUNTEER, "start", "--coordinator", url, "--host", "127.0.0.1"], home, timeout=60)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "unreachable" in line and url in line and "no cached experiment" in line
    assert time.monotonic() - started < 60


# --- volunteer hardware --------------------------------------------------------------------------


def test_hardware_json(home: Path):
    result = run([*VOLUNTEER, "hardware", "--json"], home)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"hardware", "plans", "left_out", "experiment"} <= report.keys()
    assert report["experiment"] == "tiny-stdlib-lm"
    [plan] = report["plans"]  # a CPU box serves on its CPU alone
    assert plan["device"] == "cpu" and report["left_out"] == []
    assert plan["uids"] and all(isinstance(uid, str) for uid in plan["uids"])
    assert report["hardware"]["cpu"]["cores"] >= 1


def test_hardware_table(home: Path):
    result = run([*VOLUNTEER, "hardware"], home)
    assert result.returncode == 0, result.stderr
    assert "Plan for" in result.stdout and "tiny-stdlib-lm" in result.stdout


@pytest.mark.parametrize(
    "options, expected",
    [
        pytest.param(["--gpus", "0"], "no GPU was found", id="gpus-on-a-cpu-box"),
        pytest.param(["--gpus", "0", "--device", "cpu"], "both choose devices", id="gpus-and-device"),
        pytest.param(["--gpus", ","], "give GPU indices or UUIDs", id="gpus-empty"),
        pytest.param(["--device", "cuda"], "no GPU was found", id="cuda-on-a-cpu-box"),
    ],
)
def test_hardware_with_devices_this_box_lacks(home: Path, options: list[str], expected: str):
    result = run([*VOLUNTEER, "hardware", *options], home)
    assert result.returncode == 2
    assert expected in one_line_error(result, only=True)


@pytest.mark.parametrize(
    "budget, expected",
    [pytest.param("1MB", "budget", id="too-small"), pytest.param("lots", "--max-memory", id="not-a-size")],
)
def test_hardware_with_an_impossible_budget(home: Path, budget: str, expected: str):
    result = run([*VOLUNTEER, "hardware", "--max-memory", budget], home)
    assert result.returncode == 2
    assert expected in one_line_error(result, only=True)


# --- coordinator-seed ----------------------------------------------------------------------------


def test_seed_on_a_taken_http_port(home: Path, listening_port: int):
    result = run([*SEED, "run", "--host", "127.0.0.1", "--http-port", str(listening_port),
                  "--identity", str(home / "seed.key")], home)
    assert result.returncode == 2
    line = one_line_error(result, only=True)
    assert "already in use" in line and str(listening_port) in line


# --- a running volunteer -------------------------------------------------------------------------


@pytest.mark.integration
def test_second_volunteer_on_the_same_state_dir_is_refused(home: Path, seed_url: str, processes: Processes):
    first = processes.add(start_volunteer(home, seed_url))
    match = first.wait_for_line(SERVING, timeout=150)
    uids = match.group(3).split()
    assert len(uids) == int(match.group(1)) > 0

    second = run([*VOLUNTEER, "start", "--coordinator", seed_url, "--host", "127.0.0.1"], home)
    assert second.returncode == 2
    line = one_line_error(second)
    assert f"another volunteer (pid {first.proc.pid}) is running" in line
    assert first.proc.poll() is None, "the refused volunteer must not disturb the running one"

    started = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    try:
        code = first.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"volunteer did not exit within 30 s of SIGTERM: {first.tail()}")
    assert code == 0, first.tail(20)
    assert time.monotonic() - started < 30

    # nothing of the volunteer's two process groups outlives it (itself; hivemind's workers and p2pd)
    workers = json.loads((home / "state" / "volunteer.lock").read_text())["workers"]
    assert isinstance(workers, int) and workers != first.proc.pid
    for group in (first.proc.pid, workers):
        deadline = time.monotonic() + 10
        while True:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"processes of group {group} outlived the volunteer: {_group_members(group)}")
            time.sleep(0.2)

    checkpoints = home / "data" / "checkpoints" / "test-lm"
    assert {f"{uid}.pt" for uid in uids} <= {p.name for p in checkpoints.iterdir()}
    assert not any(p.name.endswith((".tmp", ".new")) or ".corrupt-" in p.name for p in checkpoints.iterdir())


@pytest.mark.integration
def test_volunteer_on_a_taken_port(home: Path, seed_url: str, listening_port: int):
    result = run([*VOLUNTEER, "start", "--coordinator", seed_url, "--host", "127.0.0.1",
                  "--port", str(listening_port)], home)
    assert result.returncode != 0
    line = one_line_error(result)
    assert str(listening_port) in line and "address already in use" in line


def _group_members(pgid: int) -> list[str]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            members.append(re.sub(r"\s+", " ", text.split(")", 1)[0] + ")"))
    return members
