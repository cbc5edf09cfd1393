"""``volunteer.core.harness``: stopping children together says which ones ignored SIGTERM; and the order
the suite runs its files in (``tests/conftest.py``). About 2 s."""

from __future__ import annotations

import signal
import sys

import psutil

from tests.conftest import Processes, wait_for
from volunteer.core.harness import ChildProcess, stop_together

OBEYS = """
import subprocess, sys, time
left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stays in the child's group
print("ready", left.pid, flush=True)
time.sleep(60)
"""
IGNORES = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stop_together_returns_the_children_it_had_to_kill_and_kills_every_group(processes: Processes):
    obeys = processes.add(ChildProcess("obeys", [sys.executable, "-c", OBEYS]))
    ignores = processes.add(ChildProcess("ignores", [sys.executable, "-c", IGNORES]))
    grandchild = int(obeys.wait_for_line(r"^ready (\d+)", timeout=30).group(1))
    ignores.wait_for_line(r"^ready", timeout=30)

    assert stop_together([obeys, ignores], timeout=1.0) == [ignores]
    assert obeys.proc.returncode == -signal.SIGTERM
    assert ignores.proc.returncode == -signal.SIGKILL
    wait_for(lambda: _gone(grandchild), timeout=10, what="the obeying child's own child to be killed with its group")


DRAINS = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
print("ready", flush=True)
time.sleep(60)
"""


def test_stop_returns_the_exit_code_of_a_graceful_exit(processes: Processes):
    child = processes.add(ChildProcess("drains", [sys.executable, "-c", DRAINS]))
    child.wait_for_line("^ready", timeout=30)
    assert child.stop(timeout=10) == 3


# --- the suite's own order ---------------------------------------------------------------------------


def test_the_slowest_files_listed_exist_and_come_first_each_whole():
    """A renamed file would silently fall back to xdist's queue order: every listed path must exist."""
    from types import SimpleNamespace

    from tests.conftest import ROOT, SLOWEST_FILES_FIRST, pytest_collection_modifyitems

    assert all((ROOT / path).is_file() for path in SLOWEST_FILES_FIRST), SLOWEST_FILES_FIRST
    first, second = SLOWEST_FILES_FIRST[:2]
    names = ["tests/test_a.py::x", f"{second}::y", "tests/test_b.py::z", f"{first}::u", f"{second}::v", f"{first}::w"]
    items = [SimpleNamespace(nodeid=name) for name in names]
    pytest_collection_modifyitems(items)
    assert [item.nodeid for item in items] == [f"{first}::u", f"{first}::w", f"{second}::y", f"{second}::v",
                                               "tests/test_a.py::x", "tests/test_b.py::z"]
