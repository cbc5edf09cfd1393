"""Files that survive a kill -9 and a bad disk: written atomically, the previous copy kept until the
new one is whole, and an unreadable file moved aside for a person to look at instead of deleted.

``write_atomic`` (in ``paths``) makes one write whole; ``DurableJSON`` is the state-file pattern built on
it (lifetime totals, the leaderboard), and ``move_aside`` the one way any reader gives up on a file.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from volunteer.core.paths import write_atomic

logger = logging.getLogger(__name__)
T = TypeVar("T")

# What reading a damaged file raises: bad JSON or values (ValueError, TypeError, KeyError), or a
# document nested deep enough to blow the parser's stack. An OSError (EACCES, EIO) is not damage.
DAMAGE = (ValueError, TypeError, KeyError, RecursionError)


def move_aside(path: Path, what: str, error: BaseException) -> Path | None:
    """Rename an unreadable ``path`` to ``<name>.corrupt-<unix time>`` with one warning; None if even
    that failed (the file then stays where it is)."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        path.replace(aside)
    except OSError:
        logger.warning(f"{what} {path} is unreadable ({type(error).__name__}: {error}); left in place")
        return None
    logger.warning(f"{what} {path} is unreadable ({type(error).__name__}: {error}); moved to {aside.name}")
    return aside


class DurableJSON:
    """One JSON state file at ``path`` with its previous version at ``<path>.prev``.

    ``save`` keeps the current file as ``.prev`` before replacing it, each step leaving a whole file;
    ``load`` reads the newest of the two that parses, moving an unreadable one aside."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.backup = path.with_name(path.name + ".prev")

    def load(self, parse: Callable[[Any], T]) -> T | None:
        """``parse(document)`` of the newest readable copy, or None when neither exists or parses.
        ``parse`` raises one of ``DAMAGE`` to call a document unreadable."""
        for candidate in (self.path, self.backup):
            try:
                return parse(json.loads(candidate.read_bytes()))
            except FileNotFoundError:
                continue
            except DAMAGE as e:
                move_aside(candidate, self.what, e)
        return None

    def save(self, document: Any) -> None:
        data = json.dumps(document).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            current = self.path.read_bytes()
            write_atomic(self.backup, lambda f: f.write(current))
        write_atomic(self.path, lambda f: f.write(data))
