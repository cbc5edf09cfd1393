"""What serving writes to the log: a deliberate pause is not an error (issue 15.7)."""

from __future__ import annotations

import logging

import pytest
from hivemind.moe.server import runtime as hivemind_runtime

from volunteer.serving.backends import RUNTIME_LOGGER, Paused


def _log_caught(exception: BaseException) -> None:
    """What hivemind's Runtime does with an exception a backend raised."""
    try:
        raise exception
    except BaseException as caught:
        hivemind_runtime.logger.exception(f"Caught {caught}, attempting to recover")


def test_the_filter_sits_on_the_logger_hivemind_runtime_uses() -> None:
    assert hivemind_runtime.logger is RUNTIME_LOGGER


def test_a_pause_refusal_is_not_logged_but_other_failures_still_are(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        _log_caught(Paused("expert.0.1 is paused by its volunteer"))
        assert caplog.records == []
        _log_caught(ValueError("a real bug"))
    [record] = caplog.records
    assert record.levelno == logging.ERROR and "a real bug" in record.getMessage()
