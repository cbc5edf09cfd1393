"""Peer addresses checked with the parser the p2p daemon's client uses, before anything keeps them.

A multiaddr that only the daemon rejects surfaces seconds later as ``Daemon failed to start: ...
failed to parse multiaddr`` with a Go log line in front; and a bad peer list from a coordinator used to
replace the last good one in the cache first. hivemind's own parser (its vendored ``multiaddr``)
catches the same faults at once, so a bad address is a one-line error before any process starts.
"""

from __future__ import annotations

import re

# printable ASCII and a known first protocol: a cheap first gate before the real parser
_SHAPE = re.compile(r"^/(ip4|ip6|dns|dns4|dns6|dnsaddr)/[!-~]{1,500}$")


def check_maddr(text: object) -> str:
    """``text`` if it is a multiaddr the daemon can dial, else ValueError with a one-line reason."""
    if not isinstance(text, str) or not _SHAPE.match(text):
        raise ValueError(f"{str(text)!r:.80} is not a multiaddr (like /ip4/203.0.113.5/tcp/31337/p2p/Qm...)")
    # imported here: hivemind loads torch, and the config layer that calls this must stay light
    from hivemind.utils.multiaddr import Multiaddr

    try:
        Multiaddr(text)
    except Exception as e:  # the parser raises several types (StringParseError, ValueError, KeyError...)
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{text!r:.80} is not a valid multiaddr ({reason[:120]})") from None
    return text
