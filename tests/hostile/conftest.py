"""Fixtures of the hostile-input tests: a coordinator on 127.0.0.1 that answers what a test says."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.fakes import FakeCoordinator
from tests.hostile.common import new_coordinator


@pytest.fixture
def coordinator() -> Iterator[FakeCoordinator]:
    fake = new_coordinator()
    try:
        yield fake
    finally:
        fake.stop()
