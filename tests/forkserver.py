"""The fork server that tests start their hivemind server processes from (``stranger_servers``,
``test_trainer``). A module of its own that imports nothing heavy: a child unpickles its target by
importing the module that defines it, and what that module imports is paid again in every child.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context


def server_context() -> multiprocessing.context.BaseContext:
    """How tests start hivemind servers in child processes of their own: a fork server that imported
    torch and hivemind once, so each child forks from it ready instead of importing them anew (2.8 s of
    CPU each: eight servers started at once were ready 2.7-3.8x sooner than with spawn, side by side on
    the shared 2-core box). Never a plain fork of the test process, which is full of hivemind's threads; the
    fork server has only imported modules, as hivemind's own processes fork from theirs."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "hivemind"])  # read once, when the fork server starts
    return context
