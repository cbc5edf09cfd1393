"""Logging and events: plain lines on a terminal, JSON lines when headless, hivemind's chatter kept down.

Headless (``--headless``, or stdout not a terminal) is for journald and log shippers: stdout carries
one JSON object per line (events such as ``joined``, ``serving``, ``expert_restored``, ``peer_lost``,
``error`` and periodic ``stats``), stderr carries log records as JSON too. Under the dashboard, log
records go to the dashboard's events panel and to ``volunteer.log`` in the state dir instead of
stderr, where they would tear the screen.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, TextIO


def setup_logging(verbose: bool, json_lines: bool = False) -> None:
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")  # hivemind's records through our handlers: JSON, dashboard, file
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # hivemind logs every pool process it starts; a volunteer wants to see only what matters
        logging.getLogger("hivemind").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # only hivemind runs asyncio here; at exit it reports its own p2p tasks as "destroyed but pending"
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        sys.unraisablehook = _drop_hivemind_exit_noise
        # Server.shutdown runs twice in hivemind 1.1.12: once when called, once more in the finally of
        # its own thread when the runtime stops; the second finds the handlers gone and says so
        logging.getLogger("hivemind.moe.server.connection_handler").addFilter(_SecondShutdownFilter())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = dict(event="log", time=round(record.created, 3), level=record.levelname, logger=record.name,
                    message=record.getMessage())
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


class EventLog:
    """Notable moments of a volunteer's life, for people (dashboard, terminal) and for machines (JSON).

    Headless (``json_stream``): one JSON line each. Otherwise each is a log record (so the dashboard's
    log file keeps paused, resumed, draining and stopped too) and a line of the dashboard's events
    panel; those emitted before the dashboard runs (joined, expert_restored, serving) wait in a short
    backlog that ``attach`` replays, so the panel does not say "none yet" after them."""

    BACKLOG = 50

    def __init__(self, json_stream: TextIO | None = None):
        self.json_stream = json_stream
        self.sink: Callable[[str], None] | None = None  # the dashboard's events panel, once it runs
        self.backlog: deque[str] = deque(maxlen=self.BACKLOG)
        self.closing: str | None = None  # the "stopped" line, for the terminal once the dashboard is gone
        self._logger = logging.getLogger("volunteer.events")

    def emit(self, event: str, message: str, **fields: Any) -> None:
        if event == "stopped":
            self.closing = message
        if self.json_stream is not None:
            self.write(dict(event=event, time=round(time.time(), 3), message=message, **fields))
            return
        self._logger.info(message)
        if self.sink is not None:
            self.sink(message)
        else:
            self.backlog.append(message)

    def attach(self, sink: Callable[[str], None]) -> None:
        """Show events in ``sink`` from now on, the backlog first."""
        while self.backlog:
            sink(self.backlog.popleft())
        self.sink = sink

    def detach(self) -> None:
        self.sink = None

    def write(self, line: dict[str, Any]) -> None:
        try:
            self.json_stream.write(json.dumps(line) + "\n")
            self.json_stream.flush()
        except (OSError, ValueError):  # a closed pipe must not stop the volunteer
            pass


class _SinkHandler(logging.Handler):
    def __init__(self, sink: Callable[[str], None]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink(f"{record.levelname.lower()}: {record.getMessage()}")


def divert_logs_for_dashboard(sink: Callable[[str], None], log_file: Path) -> Callable[[], None]:
    """Send log records to the dashboard and a file while it runs; returns the undo function."""
    root = logging.getLogger()
    saved = list(root.handlers)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.handlers.RotatingFileHandler(log_file, maxBytes=1 << 20, backupCount=2)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [to_file, _SinkHandler(sink)]

    def restore() -> None:
        root.handlers[:] = saved
        to_file.close()

    return restore


class _SecondShutdownFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "shutdown had no effect" not in record.getMessage()


def _drop_hivemind_exit_noise(unraisable) -> None:
    """hivemind's P2P objects raise from ``__del__`` at interpreter exit (no event loop left): harmless."""
    where = getattr(unraisable.object, "__module__", None) or getattr(type(unraisable.object), "__module__", "")
    if str(where).startswith("hivemind"):
        return
    sys.__unraisablehook__(unraisable)
