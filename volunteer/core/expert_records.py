"""Expert records only their server can write, the seed's list of banned keys, and trainers' audit verdicts.

hivemind's ``declare_experts`` stores ``uid -> peer id`` unsigned, and the DHT keeps whichever value
expires last: any peer can take a uid over (hivemind #93), and a second server of a uid replaces the
first. The project's own record of a server is instead a **subkey signed by the server's record key**
under the key of the uid's *group*: a grid row, cut into groups of ``GROUP_WIDTH`` uids (``group_key``):

    <prefix>_servers.<layer>.<row>.<last coordinate // 64>  ->  { [owner:<volunteer's key>]: ServerGroupSchema }

One subkey per server and group holds its peer id, device, reachability, paused, and the samples/s it
serves each of its uids of that group. ``RSASignatureValidator`` (in every peer's
``records.record_validators``) refuses a subkey holding ``[owner:K]`` unless it is signed by K: a uid
can have any number of servers, and none can overwrite or hide another's. A group key's schema cannot
be checked by ``SchemaValidator`` (its keys are fixed field names), so readers check it (``parse_group``)
and drop what does not fit, uids that do not belong to the group, and every subkey that names no owner
(anyone may write those).

Why groups, not one key per uid or one key per layer: a 64 x 64 grid is 4,096 uids but 64 group keys,
so balancing reads the whole layer in one bounded DHT call (``dht_calls``: at most 256 keys a call),
a trainer's beam search reads only the rows its tokens reach (the keys of a row are its groups), and
a group value holds at most one subkey per server of those 64 uids, never one per volunteer of the swarm.

The seed publishes ``<prefix>_banned`` (keys it banned after failed audits) and trainers publish
``<prefix>_audits`` (per peer: calls audited and passed, and the keys that failed), both signed
subkeys that readers take only from keys they trust.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Collection, Dict, Iterable, List, Mapping, Sequence

import pydantic.v1 as pydantic
from hivemind import DHT
from hivemind.utils import get_dht_time

from volunteer.core.dht_calls import batches, get_many, get_one, wait_result
from volunteer.core.records import RECORD_TTL, key_fingerprint, owner_subkey

GROUP_WIDTH = 64  # uids of one row under one key: a 64-wide row is one key
AUDIT_PROTOCOL = 4  # what a server's answers carry (``volunteer.serving.versions``); 0 = none, 1 = a one-stream
# digest, 2 = ``state_digest`` in pieces, 3 = a two-leaf tree (weights, optimizer state) of pieces with
# streamed msgpack reveals, 4 = the same tree with BLAKE3 leaves, each over a header and the tensors' bytes
# (a server and a trainer of different protocols disagree on every digest, so a trainer reads only the
# records of its own protocol: ``audit=`` of ``read_servers`` / ``read_groups``)
_OWNER = re.compile(rb"^\[owner:(.+?)\]$", re.DOTALL)


class ServerGroupSchema(pydantic.BaseModel):
    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)
    device: pydantic.constr(strict=True, max_length=64)
    reachable: pydantic.StrictBool  # dialable directly (or not measured yet): trainers prefer such servers
    paused: pydantic.StrictBool
    audit: pydantic.conint(strict=True, ge=0, le=100)
    # uid -> samples/s this server serves it with
    uids: Dict[pydantic.constr(strict=True, min_length=1, max_length=256),
               pydantic.confloat(strict=True, ge=0.0, le=1e9)]


class BannedRecordSchema(pydantic.BaseModel):
    keys: List[pydantic.constr(strict=True, min_length=16, max_length=16)]  # key fingerprints
    peers: List[pydantic.constr(strict=True, min_length=1, max_length=128)]
    time: pydantic.StrictFloat


class AuditRecordSchema(pydantic.BaseModel):
    run: pydantic.constr(strict=True, min_length=1, max_length=64)
    # peer id -> [audited calls, passed calls] this trainer run checked
    peers: Dict[pydantic.StrictStr, pydantic.conlist(pydantic.conint(strict=True, ge=0), min_items=2, max_items=2)]
    failed_keys: List[pydantic.constr(strict=True, min_length=16, max_length=16)]
    failed_peers: List[pydantic.StrictStr]
    time: pydantic.StrictFloat


@dataclass(frozen=True)
class ServerRecord:
    """One server of one uid, as its owner signed it."""

    uid: str
    owner: bytes  # the subkey it is stored under: ``[owner:<key>]``
    peer_id: str
    device: str
    samples_per_second: float
    reachable: bool = True  # False: reached only over its own outbound connections or a relay
    paused: bool = False
    audit: int = AUDIT_PROTOCOL

    @property
    def key(self) -> str:
        """The owner's fingerprint: the name bans and verdicts use."""
        return key_fingerprint(self.owner)


def group_key(dht_prefix: str, uid: str) -> str:
    """``<prefix>_servers.L.3.0`` for ``L.3.5``: the key holding the signed servers of the uid's group."""
    head, _, last = uid.rpartition(".")
    return f"{dht_prefix}_servers.{head}.{int(last) // GROUP_WIDTH if last.isdigit() else last}"


def row_group_keys(dht_prefix: str, row_prefix: str, width: int) -> list[str]:
    """The group keys of a row prefix (``L.3.``) of ``width`` uids."""
    return [f"{dht_prefix}_servers.{row_prefix}{g}" for g in range(max(1, math.ceil(width / GROUP_WIDTH)))]


def publish_servers(dht: DHT, dht_prefix: str, uids: Sequence[str], *, peer_id: str, device: str,
                    samples_per_second: float, reachable: bool = True, paused: bool = False,
                    ttl: float = RECORD_TTL) -> dict[str, bool]:
    """Sign and store our record in each group of the uids we serve (``samples_per_second`` each), at
    most ``MAX_KEYS_PER_CALL`` groups a DHT call. ``reachable``: whether trainers can dial us directly."""
    groups: dict[str, list[str]] = defaultdict(list)
    for uid in uids:
        groups[group_key(dht_prefix, uid)].append(uid)
    values = {key: dict(peer_id=peer_id, device=device, reachable=bool(reachable), paused=bool(paused),
                        audit=AUDIT_PROTOCOL, uids={uid: float(samples_per_second) for uid in part})
              for key, part in groups.items()}
    subkey, expiration = owner_subkey(dht), get_dht_time() + ttl
    expirations = _after_our_last(subkey, list(values), expiration)
    stored: dict[str, bool] = {}
    for keys in batches(list(values)):
        future = dht.run_coroutine(partial(_store_many, keys, [values[k] for k in keys],
                                           [expirations[k] for k in keys], subkey), return_future=True)
        stored.update(wait_result(dht, future, f"publishing {len(keys)} server records"))
    return {uid: bool(stored.get(group_key(dht_prefix, uid))) for uid in uids}


ANNOUNCE_TTL = RECORD_TTL + 2.0  # what a serving volunteer announces with
WITHDRAW_TTL = RECORD_TTL + 3.0  # outlives any announcement made before it (the DHT keeps the later expiry)


def withdraw_servers(dht: DHT, dht_prefix: str, uids: Sequence[str], ttl: float = WITHDRAW_TTL) -> dict[str, bool]:
    """Replace our records by paused ones that outlive them: readers stop routing to us at once. Our next
    announcement (a resume, a restart in this process) outlives the paused record in turn."""
    return publish_servers(dht, dht_prefix, uids, peer_id="-", device="", samples_per_second=0.0, paused=True,
                           ttl=ttl)


# The DHT keeps, per subkey, the value that expires last. A node restarted in this process (a rebalance)
# announced within a second of its withdrawal, whose paused record then outlived the announcement and hid
# the server until its next one (test_balance saw it). So each of our writes of a key expires after the one
# we wrote before: the newest write wins.
_LAST_EXPIRATION: dict[tuple[bytes, str], float] = {}
_LAST_LOCK = threading.Lock()


def _after_our_last(subkey: bytes, keys: Sequence[str], expiration: float) -> dict[str, float]:
    with _LAST_LOCK:
        found = {key: max(expiration, _LAST_EXPIRATION.get((subkey, key), -math.inf) + 0.01) for key in keys}
        _LAST_EXPIRATION.update({(subkey, key): when for key, when in found.items()})
        return found


async def _store_many(keys: list[str], values: list, expirations: list[float], subkey: bytes, _dht: DHT,
                      node) -> dict:
    # module level: DHT.run_coroutine pickles the function into the DHT's process
    return await node.store_many(keys, values, expirations, subkeys=[subkey] * len(keys),
                                 num_workers=min(len(keys), 32))


def read_servers(dht: DHT, dht_prefix: str, uids: Sequence[str], *, banned: Collection[str] = (),
                 include_paused: bool = False, audit: int | None = None) -> dict[str, list[ServerRecord]]:
    """Every signed, well-formed server record of each uid, minus banned keys and banned peers: one
    read of the uids' group keys (in bounded DHT calls). ``audit``: only servers of that audit protocol."""
    keys = list(dict.fromkeys(group_key(dht_prefix, uid) for uid in uids))
    groups = read_groups(dht, keys, banned=banned, include_paused=include_paused, audit=audit)
    found: dict[str, list[ServerRecord]] = {uid: [] for uid in uids}
    for records in groups.values():
        for record in records:
            if record.uid in found:
                found[record.uid].append(record)
    return found


def read_groups(dht: DHT, keys: Sequence[str], *, banned: Collection[str] = (), include_paused: bool = False,
                timeout: float | None = None, audit: int | None = None) -> dict[str, list[ServerRecord]]:
    """The server records under each group key (``group_key``, ``row_group_keys``)."""
    answers = get_many(dht, keys, latest=True, **({} if timeout is None else dict(timeout=timeout)))
    found = {}
    for key in keys:
        entry = answers.get(key)
        value = entry.value if entry is not None else None
        items = ((subkey, item.value) for subkey, item in value.items()) if isinstance(value, dict) else ()
        found[key] = parse_group(key, items, banned=banned, include_paused=include_paused, audit=audit)
    return found


def parse_group(key: str, items: Iterable[tuple[object, object]], *, banned: Collection[str] = (),
                include_paused: bool = False, audit: int | None = None) -> list[ServerRecord]:
    """The records among a group key's ``(subkey, value)`` pairs that an owner signed, that fit the
    schema, and whose uids belong to that group (and, given ``audit``, whose server speaks that audit
    protocol: an auditing trainer would fail every honest server of another one).

    The DHT checked the signature of every subkey naming an owner; a subkey naming none was
    written by anybody, so it is dropped here."""
    prefix = key.split("_servers.", 1)[0]
    records = []
    for subkey, value in items:
        if not isinstance(subkey, bytes) or not _OWNER.match(subkey):
            continue
        try:
            parsed = ServerGroupSchema.parse_obj(value)
        except (pydantic.ValidationError, TypeError):
            continue
        if len(parsed.uids) > GROUP_WIDTH or (audit is not None and parsed.audit != audit):
            continue
        for uid, rate in parsed.uids.items():
            record = ServerRecord(uid, subkey, parsed.peer_id, parsed.device, rate, parsed.reachable, parsed.paused,
                                  parsed.audit)
            if group_key(prefix, uid) != key or record.key in banned or record.peer_id in banned:
                continue
            if record.paused and not include_paused:
                continue
            records.append(record)
    return sorted(records, key=lambda r: (r.uid, r.owner))


# --- bans and verdicts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Banned:
    keys: frozenset[str]  # key fingerprints
    peers: frozenset[str]

    def __contains__(self, name: object) -> bool:
        return name in self.keys or name in self.peers

    def __iter__(self):
        return iter(self.keys | self.peers)

    def __len__(self) -> int:
        return len(self.keys | self.peers)


NOBODY = Banned(frozenset(), frozenset())


def publish_banned(dht: DHT, dht_prefix: str, keys: Iterable[str], peers: Iterable[str],
                   ttl: float = RECORD_TTL) -> bool:
    value = dict(keys=sorted(set(keys)), peers=sorted(set(peers)), time=float(time.time()))
    future = dht.store(f"{dht_prefix}_banned", value, get_dht_time() + ttl, subkey=owner_subkey(dht),
                       return_future=True)
    return bool(wait_result(dht, future, "publishing the ban list"))


def read_banned(dht: DHT, dht_prefix: str, trusted: Collection[bytes | str]) -> Banned:
    """The union of the ban lists signed by ``trusted`` keys (the seed's: its subkey, or its fingerprint
    as ``/v1/trust`` gives it); others' lists are ignored."""
    found = get_one(dht, f"{dht_prefix}_banned", latest=True)  # bounded: a dead DHT is an error
    keys: set[str] = set()
    peers: set[str] = set()
    if found is not None and isinstance(found.value, dict):
        for owner, item in found.value.items():
            if owner not in trusted and key_fingerprint(owner) not in trusted:
                continue
            try:
                parsed = BannedRecordSchema.parse_obj(item.value)
            except (pydantic.ValidationError, TypeError):
                continue
            keys.update(parsed.keys)
            peers.update(parsed.peers)
    return Banned(frozenset(keys), frozenset(peers))


@dataclass(frozen=True)
class AuditVerdicts:
    """What one trainer run's audits found."""

    owner: bytes
    run: str
    peers: Mapping[str, tuple[int, int]]  # peer id -> (audited, passed)
    failed_keys: tuple[str, ...]
    failed_peers: tuple[str, ...]
    time: float


def publish_audits(dht: DHT, dht_prefix: str, run: str, peers: Mapping[str, tuple[int, int]],
                   failed_keys: Iterable[str], failed_peers: Iterable[str], ttl: float = RECORD_TTL) -> bool:
    value = dict(run=run, peers={p: [int(a), int(ok)] for p, (a, ok) in peers.items()},
                 failed_keys=sorted(set(failed_keys)), failed_peers=sorted(set(failed_peers)), time=float(time.time()))
    future = dht.store(f"{dht_prefix}_audits", value, get_dht_time() + ttl, subkey=owner_subkey(dht),
                       return_future=True)
    return bool(wait_result(dht, future, "publishing the audits' verdicts"))


def read_audits(dht: DHT, dht_prefix: str) -> list[AuditVerdicts]:
    """Every trainer's verdicts; which to believe is the reader's choice (the seed: its trusted key)."""
    found = get_one(dht, f"{dht_prefix}_audits", latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    verdicts = []
    for owner, item in found.value.items():
        try:
            parsed = AuditRecordSchema.parse_obj(item.value)
        except (pydantic.ValidationError, TypeError):
            continue
        verdicts.append(AuditVerdicts(owner, parsed.run, {p: (c[0], c[1]) for p, c in parsed.peers.items()},
                                      tuple(parsed.failed_keys), tuple(parsed.failed_peers), parsed.time))
    return verdicts
