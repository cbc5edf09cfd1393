"""Shared fixtures: real processes on 127.0.0.1, each test's files in its own temporary home.

hypothesis is imported here, early, because its pytest plugin otherwise imports it at session end,
and CPython 3.11's parser can fail ("AST constructor recursion depth mismatch") when it compiles
while hivemind's background threads are still alive.
"""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import hypothesis  # noqa: F401
import pytest

from volunteer.demo import ChildProcess

# Small enough for a 2-core CI box, big enough that each volunteer hosts several experts.
TEST_MANIFEST = textwrap.dedent(
    """
    schema_version = 1
    name = "test-lm"
    dht_prefix = "testlm"
    d_model = 32
    max_batch_size = 2048

    [optimizer]
    name = "adam"
    lr = 0.003

    [[expert_types]]
    name = "small"
    block = "residual_ffn"
    d_hidden = 64

    [[layers]]
    uid_prefix = "testlm_ffn0"
    grid = [2, 4]
    expert_type = "small"

    [trainer]
    seq_len = 32
    batch_size = 8
    k_best = 2
    lr = 0.003
    """
)


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
        for child in reversed(self.children):
            try:
                child.stop(timeout=20)
            except Exception:
                if child.proc.poll() is None:
                    os.killpg(child.proc.pid, signal.SIGKILL)


@pytest.fixture
def processes():
    procs = Processes()
    yield procs
    procs.stop_all()
