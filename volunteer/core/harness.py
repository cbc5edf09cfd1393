"""Starting the swarm's processes and waiting on them, bounded: what the demo, the tests and the
benches share. Children run in their own session, so stopping one stops its whole process group."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Sequence

import httpx


class ChildProcess:
    """A child process whose output lines can be awaited (bounded) and that is stopped with its group."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None, echo: IO[str] | None = None,
                 render: Callable[[str], str | None] | None = None):
        # render: what of a line ``echo`` shows (None: nothing); the raw line is kept either way
        self.name, self.echo, self.render = name, echo, render
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
            shown = self.render(line) if self.render is not None else line
            if self.echo is not None and shown:
                self.echo.write(f"[{self.name}] {shown.rstrip()}\n")
        self.lines.put("")  # end of output

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line == "" and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if match := re.search(pattern, line):
                return match
        raise TimeoutError(f"{self.name} printed no line matching {pattern!r} in {timeout:.0f} s: {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        return " | ".join(line.strip() for line in self.output[-lines:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, then SIGKILL the whole process group: nothing of the child is left behind.
        Returns its exit code (negative: the signal that ended it)."""
        stop_together([self], timeout)
        return self.proc.returncode


def stop_together(children: Sequence[ChildProcess], timeout: float = 30.0) -> list[ChildProcess]:
    """Stop every child at once: one SIGTERM each (a second would make a volunteer skip its drain), one
    shared deadline for their graceful exits, then SIGKILL each whole process group. Stopping them one
    after another cost the sum of their drains (a test's teardown of three volunteers took 20 s).
    Returns the children that were still running at the deadline, so had to be killed (every group is
    killed anyway, for what a child left behind)."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    killed = [child for child in children if child.proc.poll() is None]
    for child in children:
        try:
            os.killpg(child.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        child.proc.wait(timeout=10)
    return killed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_http_ok(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def start_seed(echo: IO[str] | None = None, experiment: Path | None = None, home: Path | None = None) -> tuple[ChildProcess, str]:
    port = free_port()
    argv = [sys.executable, "-m", "coordinator_seeds.cli", "run", "--host", "127.0.0.1", "--http-port", str(port)]
    if experiment is not None:
        argv += ["--experiment", str(experiment)]
    if home is not None:
        argv += ["--data-dir", str(home)]  # its identity, trusted trainer key and leaderboard
    seed = ChildProcess("seed", argv, echo=echo)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/healthz", timeout=90)
    except TimeoutError:
        seed.stop()
        raise
    return seed, url


def start_volunteer(home: Path, url: str, *extra: str, echo: IO[str] | None = None, name: str = "volunteer",
                    render: Callable[[str], str | None] | None = None) -> ChildProcess:
    argv = [sys.executable, "-m", "volunteer.cli", "start", "--coordinator", url, "--host", "127.0.0.1", *extra]
    return ChildProcess(name, argv, env={"VOLUNTEER_HOME": str(home)}, echo=echo, render=render)


def start_trainer(url: str, key: Path, steps: int | None = None, *, log_every: int = 10,
                  echo: IO[str] | None = None) -> ChildProcess:
    """``coordinator-seed train`` against the seed at ``url``, signing its contributions with ``key``."""
    argv = [sys.executable, "-m", "coordinator_seeds.cli", "train", "--coordinator", url, "--key", str(key),
            "--log-every", str(log_every)]
    if steps is not None:
        argv += ["--steps", str(steps)]
    return ChildProcess("trainer", argv, echo=echo)
