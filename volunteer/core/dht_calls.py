"""Every multi-key call this project makes into hivemind's DHT, bounded in keys, concurrency and time.

hivemind's DHT runs in its own process and takes each request through a pipe. A request over ~1,000
keys (``get_experts`` of a 32 x 32 grid) killed that process as it read the request
(``[Errno 11] Resource temporarily unavailable``), and a caller blocked on ``future.result()`` waited
for ever. So here:

- no call carries more than ``MAX_KEYS_PER_CALL`` keys (256 were seen to work), and at most
  ``MAX_CALLS_IN_FLIGHT`` batches of one caller are in flight at once;
- every wait is bounded, and a DHT process that died is said in one line (``DHTUnavailable``)
  instead of a silent stall.

It also reads hivemind's grid prefix records: ``declare_experts`` stores, for a uid ``L.3.5``, the
subkey 5 of the row key ``L.3.`` holding ``(uid, peer id)`` (on deeper grids every level but the
first, ``L.3.`` for ``L.3.5.7`` too). A reader learns which uids are served a row at a time, without
looking up every uid (``active_successors``). hivemind stores no record of the first level (its beam
search scores every first coordinate), so our servers add one (``declare_grid_roots``): the subkey 3
of ``L.`` holding ``(uid, peer id)``, in hivemind's format, so that a reader finds the active rows in
one key instead of reading every row.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

from hivemind import DHT
from hivemind.dht import DHTNode
from hivemind.moe.client.expert import RemoteExpert, create_remote_experts
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration

MAX_KEYS_PER_CALL = 256
MAX_CALLS_IN_FLIGHT = 2
CALL_TIMEOUT = 30.0  # one batch; a healthy loopback DHT answers 256 keys in well under a second
LATEST = float("inf")  # sufficient expiration: search for the newest record instead of the first found


class DHTUnavailable(RuntimeError):
    """The DHT process died or did not answer in time; the message is one line."""


def batches(keys: Sequence[Any], size: int = MAX_KEYS_PER_CALL) -> Iterator[list[Any]]:
    """``keys`` in consecutive lists of at most ``size``."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(keys), size):
        yield list(keys[start:start + size])


def wait_result(dht: DHT, future: Any, what: str, timeout: float = CALL_TIMEOUT) -> Any:
    """``future.result()``, at most ``timeout`` seconds, checking every second that the DHT process
    lives: a future of a dead DHT is never set, and waiting on it is the stall this module exists for."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return future.result(timeout=max(0.0, min(1.0, left)))
        except concurrent.futures.TimeoutError:
            if not dht.is_alive():
                raise DHTUnavailable(f"hivemind's DHT process (pid {dht.pid}) died while {what}") from None
            if left <= 0:
                raise DHTUnavailable(f"the DHT did not answer within {timeout:.0f} s while {what}") from None
        except (EOFError, BrokenPipeError, ConnectionError) as e:
            raise DHTUnavailable(f"hivemind's DHT process (pid {dht.pid}) is gone ({type(e).__name__}) "
                                 f"while {what}") from None


def start_bounded(dht: DHT, timeout: float, what: str = "joining the DHT") -> DHT:
    """Start ``dht`` (built with ``start=False``) and wait until it is ready, at most ``timeout``
    seconds: hivemind's own wait has no bound, and a DHT process killed before it is ready never says so."""
    dht.run_in_background(await_ready=False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            dht.wait_until_ready(timeout=1.0)
            return dht
        except concurrent.futures.TimeoutError:
            if not dht.is_alive():
                raise DHTUnavailable(f"hivemind's DHT process (pid {dht.pid}) died while {what}") from None
            if time.monotonic() >= deadline:
                dht.shutdown()
                raise DHTUnavailable(f"the DHT was not ready within {timeout:.0f} s while {what}") from None


def _bounded_map(dht: DHT, start: Any, key_batches: list[list[Any]], what: str, timeout: float) -> list[Any]:
    """``start(batch)`` -> future for every batch, at most ``MAX_CALLS_IN_FLIGHT`` in flight; results in order."""
    results: list[Any] = [None] * len(key_batches)
    in_flight: list[tuple[int, Any]] = []
    for index, batch in enumerate(key_batches):
        if len(in_flight) >= MAX_CALLS_IN_FLIGHT:
            done, future = in_flight.pop(0)
            results[done] = wait_result(dht, future, what, timeout)
        in_flight.append((index, start(batch)))
    for done, future in in_flight:
        results[done] = wait_result(dht, future, what, timeout)
    return results


async def _get_many(_dht: DHT, node: DHTNode, keys: list[Any], latest: bool) -> dict[Any, Any]:
    # runs in the DHT process: one traversal for the batch, as hivemind's own get_experts does
    return await node.get_many(keys, sufficient_expiration_time=LATEST if latest else None,
                               num_workers=min(len(keys), 32))


def get_many(dht: DHT, keys: Sequence[Any], *, latest: bool = False,
             timeout: float = CALL_TIMEOUT) -> dict[Any, ValueWithExpiration | None]:
    """Each key's value (None if absent), read in batches of at most ``MAX_KEYS_PER_CALL`` keys."""
    keys = list(dict.fromkeys(keys))

    def start(batch: list[Any]) -> Any:
        return dht.run_coroutine(partial(_get_many, keys=batch, latest=latest), return_future=True)

    found: dict[Any, Any] = {}
    for part in _bounded_map(dht, start, list(batches(keys)), f"reading {len(keys)} keys", timeout):
        found.update(part)
    return found


def get_one(dht: DHT, key: str, *, latest: bool = False, timeout: float = CALL_TIMEOUT) -> ValueWithExpiration | None:
    """``dht.get`` with a bounded wait."""
    return wait_result(dht, dht.get(key, latest=latest, return_future=True), f"reading {key}", timeout)


def get_experts(dht: DHT, uids: Sequence[str], *, latest: bool = True,
                timeout: float = CALL_TIMEOUT) -> list[RemoteExpert | None]:
    """hivemind's ``get_experts`` (a uid's record holds its server's peer id), read in batches of at
    most ``MAX_KEYS_PER_CALL`` uids and bounded in time."""
    found = get_many(dht, uids, latest=latest, timeout=timeout)
    infos = [expert_info(uid, found.get(uid)) for uid in uids]
    return create_remote_experts(infos, dht) if any(infos) else [None] * len(infos)


def expert_info(uid: str, found: ValueWithExpiration | str | None) -> ExpertInfo | None:
    """The server of ``uid`` from its record (or a peer id string); None for a missing or garbled one
    (``records.withdraw_experts`` leaves an empty marker that is no peer id)."""
    value = getattr(found, "value", found)
    if not isinstance(value, str) or not value:
        return None
    try:
        return ExpertInfo(uid, PeerID.from_base58(value))
    except (ValueError, TypeError):
        return None


# --- hivemind's grid prefix records --------------------------------------------------------------


def root_prefix(uid: str) -> str:
    """``L.`` for ``L.3.5``: the key whose subkeys list the active first coordinates of the grid."""
    return uid.split(".", 1)[0] + "."


def parent_prefix(uid: str) -> str:
    """``L.3.`` for ``L.3.5``: the key whose subkeys list the served uids of that row."""
    return uid.rsplit(".", 1)[0] + "."


def successors_of(found: ValueWithExpiration | None) -> dict[int, tuple[str, str]]:
    """A prefix record's ``{next coordinate: (uid, peer id)}``; hivemind's negative-cache entries
    (subkey -1 holding None) and malformed values are skipped."""
    if found is None or not hasattr(found.value, "items"):
        return {}
    out = {}
    for coord, item in found.value.items():
        value = getattr(item, "value", None)
        if (isinstance(coord, int) and coord >= 0 and isinstance(value, (tuple, list)) and len(value) == 2
                and all(isinstance(v, str) for v in value)):
            out[coord] = (value[0], value[1])
    return out


def active_successors(dht: DHT, prefixes: Sequence[str], *, latest: bool = True,
                      timeout: float = CALL_TIMEOUT) -> dict[str, dict[int, tuple[str, str]]]:
    """For each prefix (``L.`` or ``L.3.``), its active next coordinates and a ``(uid, peer id)`` under
    each, read in bounded batches (what hivemind's ``MoEBeamSearcher.get_active_successors`` reads)."""
    found = get_many(dht, prefixes, latest=latest, timeout=timeout)
    return {prefix: successors_of(found.get(prefix)) for prefix in prefixes}


async def _store_roots(_dht: DHT, node: DHTNode, uids: list[str], peer_id: str, expiration: float) -> bool:
    keys = [root_prefix(uid) for uid in uids]
    subkeys = [int(uid.split(".")[1]) for uid in uids]
    values = [(uid, peer_id) for uid in uids]
    stored = await node.store_many(keys, values, expiration, subkeys=subkeys, num_workers=min(len(uids), 32))
    return all(stored.values())


def declare_grid_roots(dht: DHT, uids: Sequence[str], expiration: float, *, timeout: float = CALL_TIMEOUT) -> bool:
    """Say under each uid's root prefix (``L.``, subkey: its first coordinate) that its row has a server.
    One uid a row is enough; uids of one-dimensional grids have no row and are skipped."""
    rows: dict[tuple[str, str], str] = {}
    for uid in uids:
        if uid.count(".") >= 2:
            rows.setdefault((root_prefix(uid), uid.split(".")[1]), uid)
    ok = True
    for batch in batches(list(rows.values())):
        future = dht.run_coroutine(partial(_store_roots, uids=batch, peer_id=dht.peer_id.to_base58(),
                                           expiration=expiration), return_future=True)
        ok = wait_result(dht, future, f"declaring {len(batch)} grid rows", timeout) and ok
    return ok
