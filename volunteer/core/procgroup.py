"""Keeping hivemind's processes one group: none may outlive the volunteer.

hivemind forks a DHT process, connection handlers and two TaskPool processes per expert, and the
DHT starts a p2pd daemon. Killing only the main pid leaves them running as orphans that accept calls,
never answer, and keep the peer identity, so a restart fails (ENGINE-NOTES). Three defences:

1. every child forked by this process gets ``PR_SET_PDEATHSIG = SIGKILL``: it dies with its parent;
   it also drops the parent's signal handlers (trio's would swallow the SIGTERM hivemind uses to
   stop its pools) and ignores SIGINT and SIGHUP, so Ctrl-C or a closed terminal reaches only the
   supervisor, which stops the rest in order;
2. the volunteer leads its own process group, the terminal's foreground one, and puts every worker
   it forks (and p2pd, which the DHT process execs) in a second group: a terminal's Ctrl-C or
   hangup then reaches the supervisor alone (p2pd resets its signals on exec, so ignoring them is
   not enough), which drains the workers in order;
3. both groups are recorded in a lock file, and at start a lock held by a dead volunteer's
   leftovers is cleared by killing those groups.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

_PR_SET_PDEATHSIG = 1
_installed = False
_worker_group: int | None = None  # the group forked children join (isolate_workers)
_before_exit_now: list = []  # what must run even when exit_now skips every other cleanup


def on_exit_now(action) -> None:
    """Run ``action`` (restoring the terminal, say) if the process leaves through ``exit_now``."""
    _before_exit_now.append(action)


def forget_on_exit_now(action) -> None:
    if action in _before_exit_now:
        _before_exit_now.remove(action)


def die_with_parent() -> None:
    """Make every process this one forks from now on die when its parent does (Linux only).

    The kernel's "parent" is the forking *thread*: fork hivemind peers only from threads that live
    as long as the peer (the main thread, hivemind's Server thread), never from a worker pool."""
    def after_fork_in_child() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal is the supervisor's to handle
        if _worker_group is not None:
            try:
                os.setpgid(0, _worker_group)
            except OSError:
                pass  # the anchor is gone: this process is being torn down with its parent anyway

    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    os.register_at_fork(after_in_child=after_fork_in_child)
    _installed = True


def isolate_workers() -> int:
    """Start the group that every process forked from now on joins, anchored by an idle child.

    A group needs a live member to be joined, and the parent must know its id before each fork; a
    tiny anchor process (dying with us) is both. Returns the group id."""
    global _worker_group
    if _worker_group is not None:
        return _worker_group
    die_with_parent()
    pid = os.fork()
    if pid == 0:  # the anchor: the at-fork hook made it die with us; it only waits
        try:
            os.setpgid(0, 0)
            if os.getppid() == 1:
                os._exit(0)
            while True:
                signal.pause()
        finally:
            os._exit(0)
    try:
        os.setpgid(pid, pid)  # also here: whichever of the two runs first makes the group
    except OSError:
        pass
    _worker_group = pid
    return pid


def worker_group() -> int | None:
    return _worker_group


def lead_process_group() -> None:
    """Become the leader of a new process group unless already one (a shell's job already is).

    Run from a terminal without job control (``sh -c "volunteer start; ..."``, tmux, ssh commands),
    the new group must also become the terminal's foreground group, or it gets neither the keys the
    dashboard reads nor the SIGINT of Ctrl-C; the shell's group gets the terminal back at exit."""
    if os.getpgid(0) == os.getpid():
        return
    previous = os.getpgrp()
    in_foreground = _foreground_group() == previous
    os.setpgid(0, 0)
    if in_foreground:
        _give_terminal_to(os.getpgrp())
        atexit.register(_give_terminal_to, previous)
        on_exit_now(lambda: _give_terminal_to(previous))


def _foreground_group() -> int | None:
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) if sys.stdin is not None and sys.stdin.isatty() else None
    except (OSError, ValueError):
        return None


def _give_terminal_to(pgid: int) -> None:
    # a background group changing the foreground gets SIGTTOU unless it ignores it
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(sys.stdin.fileno(), pgid)
    except (OSError, ValueError):
        pass  # the terminal or that group is gone: nothing to hand back
    finally:
        signal.signal(signal.SIGTTOU, previous)


def become_supervisor() -> None:
    """Call once at the start of any process that forks hivemind peers (volunteer, seed, trainer)."""
    lead_process_group()
    die_with_parent()


def unwrap(error: BaseException) -> BaseException:
    """The one real error inside trio's exception groups, for a one-line message."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class AlreadyRunning(RuntimeError):
    """Another live volunteer holds this state directory."""


@dataclass
class InstanceLock:
    """An exclusive ``flock`` on ``<state_dir>/volunteer.lock`` holding our pid and process group."""

    path: Path
    fd: int | None = None

    def acquire(self, wait_for_leftovers: float = 15.0) -> str | None:
        """Take the lock; returns a warning line if a crashed volunteer's leftovers had to be killed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        warning = None
        deadline = time.monotonic() + wait_for_leftovers
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            owner = self._read_owner()
            if owner.get("pid") and is_alive(owner["pid"]):
                os.close(fd)
                raise AlreadyRunning(
                    f"another volunteer (pid {owner['pid']}) is running with state dir {self.path.parent}"
                )
            if time.monotonic() > deadline:
                os.close(fd)
                raise AlreadyRunning(f"{self.path} is held by leftover processes that could not be stopped")
            warning = self._kill_leftovers(owner.get("pgid"), owner.get("workers"))
            time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(dict(pid=os.getpid(), pgid=os.getpgid(0), workers=_worker_group,
                                     started=time.time())).encode())
        os.fsync(fd)
        self.fd = fd
        return warning

    def _read_owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text() or "{}")
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _kill_leftovers(*groups: object) -> str:
        ours = {os.getpgid(0), _worker_group}
        groups = tuple(g for g in groups if isinstance(g, int) and g > 1 and g not in ours)
        if not groups:
            return "a crashed volunteer left this state dir locked; waiting for its processes to exit"
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return f"stopped the leftover processes of a crashed volunteer (process groups {', '.join(map(str, groups))})"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process; a zombie counts as dead: it holds nothing."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def group_members(pgid: int) -> list[psutil.Process]:
    """Every live (not zombie) process of a process group."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (OSError, psutil.Error):
            continue  # it exited while we looked
    return members


def exit_now(code: int) -> None:
    """Leave at once (a second Ctrl-C): kill the rest of our group, skip every cleanup handler.

    Files stay whole because every one of them is written to a temporary name and renamed."""
    for action in reversed(_before_exit_now):
        try:
            action()
        except Exception:  # leaving now matters more than any one clean-up
            pass
    me = os.getpid()
    if _worker_group is not None:
        try:
            os.killpg(_worker_group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in group_members(os.getpgid(0)):
        try:
            if process.pid != me and process.ppid() == me:  # our children only: `volunteer start | tee` shares the group
                process.kill()
        except psutil.NoSuchProcess:
            pass
    os._exit(code)
