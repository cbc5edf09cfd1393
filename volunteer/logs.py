"""Logging set-up shared by both command lines: plain lines on stderr, hivemind's chatter kept down."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # hivemind logs every pool process it starts; a volunteer wants to see only what matters
        logging.getLogger("hivemind").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # only hivemind runs asyncio here; at exit it reports its own p2p tasks as "destroyed but pending"
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        sys.unraisablehook = _drop_hivemind_exit_noise


def _drop_hivemind_exit_noise(unraisable) -> None:
    """hivemind's P2P objects raise from ``__del__`` at interpreter exit (no event loop left): harmless."""
    where = getattr(unraisable.object, "__module__", None) or getattr(type(unraisable.object), "__module__", "")
    if str(where).startswith("hivemind"):
        return
    sys.__unraisablehook__(unraisable)
