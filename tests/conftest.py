"""Shared fixtures: real processes on 127.0.0.1, each test's files in its own temporary home.

hypothesis is imported here, early, because its pytest plugin otherwise imports it at session end,
and CPython 3.11's parser can fail ("AST constructor recursion depth mismatch") when it compiles
while hivemind's background threads are still alive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import hypothesis  # noqa: F401
import pytest

from coordinator_seeds.dispatch import shutdown_dht
from volunteer.core import records
from volunteer.core.harness import ChildProcess, start_seed, stop_together
from volunteer.core.seed_client import fetch_experiment

# The files that take longest, longest first (seconds, from CI's durations on the 2-core box). `make test`
# hands whole files to its two workers in collection order (--dist loadfile --no-loadscope-reorder),
# so these start first and the many short files fill in around them. xdist's default order (most tests
# first) queued these few-test, minutes-long files last: test_wan alone ran for minutes on one worker
# while the other had nothing left to do.
ROOT = Path(__file__).resolve().parent.parent  # the checkout: node ids are relative to it
SLOWEST_FILES_FIRST = (
    "tests/test_wan.py",  # ~230 s: a network lab with 40 ms links, volunteers and a trainer
    "tests/test_guest.py",  # ~190 s: volunteers killed and drained under a trainer's load
    "tests/test_strangers.py",  # ~120 s: eight server processes, then audits
    "tests/test_scale.py",  # ~75 s: three seeds, grids of up to 4,096 uids
    "tests/test_netlab.py",  # ~90 s: NATed volunteers in a network lab
    "tests/test_live.py",  # ~70 s
    "tests/test_swarm.py",  # ~60 s
    "tests/test_first_hour.py",  # ~60 s: the demo end to end
    "tests/test_trainer.py",  # ~60 s
    "tests/test_cli.py",  # ~60 s
    "tests/test_balance.py",  # ~40 s: four volunteers one after another
    "tests/test_leaderboard.py",  # ~40 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest files first (``SLOWEST_FILES_FIRST``), every other file after them in its usual order."""
    rank = {path: i for i, path in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: files stay whole


def grid_manifest(name: str, grids: list[tuple[int, ...]], *, d_model: int = 32, d_hidden: int = 64,
                  expert_types: dict[str, tuple[str, int]] | None = None, max_batch_size: int = 2048,
                  lr: float = 0.003) -> str:
    """An experiment named ``name`` with one layer ``<name>_ffn<i>`` per grid.

    ``expert_types`` maps each type's name to its ``(block, d_hidden)``, layer ``i`` taking the ``i``-th
    type (cycling); by default one type, ``small``: a ``residual_ffn`` of ``d_hidden``. ``lr`` is the
    volunteers' optimizer's."""
    types = expert_types or {"small": ("residual_ffn", d_hidden)}
    names = list(types)
    type_tables = "".join(
        f'\n[[expert_types]]\nname = "{type_name}"\nblock = "{block}"\nd_hidden = {hidden}\n'
        for type_name, (block, hidden) in types.items()
    )
    layers = "".join(
        f'\n[[layers]]\nuid_prefix = "{name}_ffn{i}"\ngrid = {list(grid)}\nexpert_type = "{names[i % len(names)]}"\n'
        for i, grid in enumerate(grids)
    )
    return textwrap.dedent(f"""
        schema_version = 1
        name = "{name}"
        dht_prefix = "{name}"
        d_model = {d_model}
        max_batch_size = {max_batch_size}

        [optimizer]
        name = "adam"
        lr = {lr}

        [trainer]
        seq_len = 32
        batch_size = 8
        k_best = 2
        lr = 0.003
        """) + type_tables + layers


# Small enough for a 2-core CI box, big enough that each volunteer hosts several experts.
TEST_MANIFEST = grid_manifest("testlm", [(2, 4)]).replace('name = "testlm"', 'name = "test-lm"', 1)


@pytest.fixture(autouse=True)
def volunteer_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test touches the real config, data or cache dirs."""
    home = tmp_path / "home"
    monkeypatch.setenv("VOLUNTEER_HOME", str(home))
    return home


@pytest.fixture
def manifest_file(tmp_path: Path) -> Path:
    path = tmp_path / "test-lm.toml"
    path.write_text(TEST_MANIFEST)
    return path


class Processes:
    """Every child a test starts, stopped with its whole process group at teardown."""

    def __init__(self) -> None:
        self.children: list[ChildProcess] = []

    def add(self, child: ChildProcess) -> ChildProcess:
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        try:
            stop_together(self.children, timeout=20)
        except Exception:
            for child in self.children:
                if child.proc.poll() is None:
                    os.killpg(child.proc.pid, signal.SIGKILL)


@pytest.fixture
def processes():
    procs = Processes()
    yield procs
    procs.stop_all()


# --- a live swarm on loopback: one seed per test module, volunteers and clients per test ---------

VOLUNTEER = [sys.executable, "-m", "volunteer.cli"]
SERVING_EVENT = r'^\{"event": "serving"'


def cli(home: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "VOLUNTEER_HOME": str(home)}
    return subprocess.run([*VOLUNTEER, *argv], capture_output=True, text=True, env=env, timeout=timeout)


def run(argv: list[str], home: Path, timeout: float = 120, columns: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VOLUNTEER_COORDINATOR"}
    env.update(VOLUNTEER_HOME=str(home), PYTHONUNBUFFERED="1", COLUMNS=str(columns))
    # a session of its own, so a failing test can never leave its children in ours
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{argv} did not exit in {timeout} s: {stderr[-2000:]}")
    finally:
        _kill_group(proc.pid)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def one_line_error(result: subprocess.CompletedProcess, *, only: bool = False) -> str:
    """The error line of a failed command: the last line on stderr, the only one starting with 'error'."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, f"nothing on stderr; stdout: {result.stdout[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error") for line in lines) == 1, result.stderr
    if only:
        assert len(lines) == 1, result.stderr
    return lines[-1]


def json_lines(child: ChildProcess) -> list[dict]:
    return [json.loads(line) for line in child.output if line.startswith("{")]


def serving_event(child: ChildProcess) -> dict:
    return json.loads(child.wait_for_line(SERVING_EVENT, timeout=150).string)


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Iterator[tuple[str, object]]:
    root = tmp_path_factory.mktemp("live-seed")
    manifest = root / "test-lm.toml"
    manifest.write_text(TEST_MANIFEST)
    procs = Processes()
    try:
        child, url = start_seed(experiment=manifest, home=root)
        procs.add(child)
        yield url, fetch_experiment(url, root / "cache")
    finally:
        procs.stop_all()


@pytest.fixture
def short_home() -> Iterator[Path]:
    """Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer than that."""
    home = Path(tempfile.mkdtemp(prefix="vol-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def client(seed) -> Iterator:
    _url, experiment = seed
    dht = records.join_dht(experiment.manifest.dht_prefix, experiment.initial_peers, client_mode=True)
    try:
        yield dht
    finally:
        shutdown_dht(dht)


def status(home: Path) -> dict:
    result = cli(home, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(condition, timeout: float, what: str, period: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(period)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
