"""What every peer of an experiment says in the DHT, and how it joins it.

Three kinds of records live in the DHT:
- hivemind's own expert records (``declare_experts`` / ``get_experts``): uid -> serving peer;
- ``<prefix>_volunteers.<n>``: one signed subkey per volunteer (its uids, device and measured speed),
  in one of ``VOLUNTEER_SHARDS`` keys chosen by a hash of its record key, so that no one DHT value
  holds every volunteer of a large swarm (readers take the shards in one bounded call);
- ``<prefix>_trainer``: one signed subkey per trainer with its latest step and loss, for dashboards;
- ``<prefix>_callers``: one signed subkey per trainer with its peer id and public addresses, so that a
  volunteer behind a NAT can dial it and hold the connection over which the trainer then calls it;
- ``<prefix>_reach``: one signed subkey per volunteer saying how it can be reached (``reachability``).

Our records are signed (``RSASignatureValidator``: a subkey holding ``[owner:<key>]`` can only be
written by that key) and typed (``SchemaValidator``). Every peer of the swarm must use the same
validators, so they are built here, once. A volunteer signs with a key kept in its data dir
(``use_record_key``), so it is the same owner in every run, as its peer id is the same peer.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import pydantic.v1 as pydantic
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.p2p import P2PDaemonError
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from volunteer.core.dht_calls import get_many, get_one, start_bounded, wait_result
from volunteer.core.paths import write_atomic

RECORD_TTL = 60.0  # seconds a volunteer or trainer record lives unless refreshed
JOIN_TIMEOUT = 120.0  # p2pd's own start-up allows 15 s; a slow, shared box needs more, never for ever


class VolunteerRecordSchema(pydantic.BaseModel):
    peer_id: pydantic.StrictStr
    uids: List[pydantic.StrictStr]
    device: pydantic.StrictStr
    samples_per_second: pydantic.confloat(strict=True, ge=0.0)


class TrainerRecordSchema(pydantic.BaseModel):
    step: pydantic.conint(strict=True, ge=0)
    loss: pydantic.StrictFloat
    time: pydantic.StrictFloat


class ContributionsRecordSchema(pydantic.BaseModel):
    run: pydantic.constr(strict=True, min_length=1, max_length=64)
    # volunteer peer id -> [forward samples, backward samples] its experts answered this trainer run
    peers: Dict[pydantic.StrictStr, pydantic.conlist(pydantic.conint(strict=True, ge=0), min_items=2, max_items=2)]
    time: pydantic.StrictFloat


class CallerRecordSchema(pydantic.BaseModel):
    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)
    maddrs: pydantic.conlist(pydantic.constr(strict=True, max_length=256), max_items=16)
    time: pydantic.StrictFloat


class ReachRecordSchema(pydantic.BaseModel):
    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)
    reachability: pydantic.constr(strict=True, max_length=16)
    time: pydantic.StrictFloat


class _ExperimentSchema(pydantic.BaseModel):
    volunteers: Dict[BytesWithPublicKey, VolunteerRecordSchema]
    trainer: Dict[BytesWithPublicKey, TrainerRecordSchema]
    contributions: Dict[BytesWithPublicKey, ContributionsRecordSchema]
    callers: Dict[BytesWithPublicKey, CallerRecordSchema]
    reach: Dict[BytesWithPublicKey, ReachRecordSchema]


@dataclass(frozen=True)
class TrainerProgress:
    step: int
    loss: float
    time: float


@dataclass(frozen=True)
class VolunteerRecord:
    peer_id: str
    uids: tuple[str, ...]
    device: str
    samples_per_second: float


class StoredRSAKey(RSAPrivateKey):
    """hivemind's RSA signing key, read from a file instead of generated."""

    def __init__(self, der: bytes):
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"an RSA key was expected, found {type(key).__name__}")
        self._private_key = key


def use_record_key(path: Path) -> RSAPrivateKey:
    """Sign this process's records with the key in ``path`` (``record_key``).

    hivemind's validators and ``owner_subkey`` sign with its process-wide key: this installs ours as
    that key, so call it before the DHT is built."""
    key = record_key(path)
    with RSAPrivateKey._process_wide_key_lock:
        RSAPrivateKey._process_wide_key = key
    return key


def record_key(path: Path) -> RSAPrivateKey:
    """The signing key in ``path`` (DER, owner-only), made there if missing. A file that holds no key
    is refused in one line and left alone: it is an identity, and replacing it would make its owner
    a stranger to the swarm."""
    try:
        key: RSAPrivateKey = StoredRSAKey(path.read_bytes())
    except FileNotFoundError:
        key = RSAPrivateKey()
        if not _create_once(path, key.to_bytes()):  # another process (a seed, a trainer) made it first
            return record_key(path)
    except (OSError, ValueError, TypeError) as e:
        reason = str(e).split(". ")[0]  # cryptography's messages run on for several sentences
        raise ValueError(f"the record signing key {path} is unreadable ({reason}); move it away to sign "
                         "as a new peer") from None
    return key


def _create_once(path: Path, data: bytes) -> bool:
    """Write ``data`` whole to ``path``, owner-only, unless ``path`` exists; False if it did."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f) -> None:
        os.fchmod(f.fileno(), 0o600)  # before a byte of the key is in it
        f.write(data)

    return write_atomic(path, write, replace=False)


def record_validators(dht_prefix: str) -> list:
    signer = RSASignatureValidator()
    return [signer, SchemaValidator(_ExperimentSchema, prefix=dht_prefix)]


def join_dht(
    dht_prefix: str,
    initial_peers: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    identity_path: Path | None = None,
    client_mode: bool = False,
    announce_host: str | None = None,
    startup_timeout: float | None = None,
) -> DHT:
    """Start a DHT peer in its own process, with this experiment's validators."""
    kwargs: dict = dict(host_maddrs=[f"/ip4/{host}/tcp/{port}"])
    if startup_timeout is not None:
        kwargs["startup_timeout"] = startup_timeout
    if identity_path is not None:
        identity_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["identity_path"] = str(identity_path)
    if announce_host is not None:
        kwargs["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
    dht = DHT(
        initial_peers=list(initial_peers),
        start=False,
        client_mode=client_mode,
        record_validators=record_validators(dht_prefix),
        **kwargs,
    )
    try:
        start_bounded(dht, JOIN_TIMEOUT)  # hivemind's own wait for the DHT process has no bound
    except P2PDaemonError as e:
        raise JoinError(daemon_failure(str(e), initial_peers)) from None
    except ValueError as e:  # cryptography's words for a damaged key file, several lines of them
        if identity_path is None or "deserialize key data" not in str(e):
            raise
        raise JoinError(f"identity file {identity_path} is unreadable ({str(e).split('.')[0]}); move it aside to "
                        "join with a new peer id") from None
    dht.get_visible_maddrs()  # a hand-built peer sometimes fails to bootstrap until its addresses are read
    return dht


class JoinError(ConnectionError):
    """The DHT could not be joined: the p2p daemon's failure, said in one line a person can act on."""


_GO_LOG_PREFIX = re.compile(r"^(Daemon failed to start:\s*)?(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\s+)?")


def daemon_failure(message: str, initial_peers: Sequence[str]) -> str:
    """The daemon's own words without the Go log's timestamp, and what they mean for a volunteer."""
    reason = _GO_LOG_PREFIX.sub("", message.strip().splitlines()[0] if message.strip() else "").strip()
    if "failed to connect to bootstrap peers" in reason:
        peers = ", ".join(initial_peers[:2]) + (f" and {len(initial_peers) - 2} more" if len(initial_peers) > 2 else "")
        return (f"could not reach any initial peer ({peers}): is the swarm's seed running and reachable from "
                f"here? (peers from a cached experiment may be stale)")
    return f"the p2p daemon did not start: {reason or 'no reason given'}"


def visible_maddrs(dht: DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


def owner_subkey(dht: DHT) -> bytes:
    """This process's signed subkey; ``record_validators`` made the signer the process-wide default."""
    return RSASignatureValidator().local_public_key


VOLUNTEER_SHARDS = 16  # keys the volunteer records are spread over: ~N/16 subkeys a value, one call to read


def volunteer_key(dht_prefix: str, owner: bytes) -> str:
    """The shard of ``<prefix>_volunteers`` that holds the record signed by ``owner``."""
    shard = int.from_bytes(hashlib.sha256(owner).digest()[:4], "little") % VOLUNTEER_SHARDS
    return f"{dht_prefix}_volunteers.{shard}"


def publish_volunteer(dht: DHT, dht_prefix: str, record: VolunteerRecord, ttl: float = RECORD_TTL) -> bool:
    value = dict(
        peer_id=record.peer_id, uids=list(record.uids), device=record.device,
        samples_per_second=float(record.samples_per_second),
    )
    owner = owner_subkey(dht)
    future = dht.store(volunteer_key(dht_prefix, owner), value, get_dht_time() + ttl, subkey=owner, return_future=True)
    return bool(wait_result(dht, future, "publishing our volunteer record"))


def withdraw_volunteer(dht: DHT, dht_prefix: str, ttl: float = RECORD_TTL) -> bool:
    """Overwrite our record with an empty one, so peers stop counting us.

    The DHT keeps whichever value of a key expires last, so the empty record must outlive the one it
    replaces; readers skip it."""
    empty = dict(peer_id="", uids=[], device="", samples_per_second=0.0)
    owner = owner_subkey(dht)
    return bool(dht.store(volunteer_key(dht_prefix, owner), empty, get_dht_time() + ttl + 1.0, subkey=owner))


def withdraw_experts(dht: DHT, uids: Sequence[str], expiration: float) -> dict[str, bool]:
    """Hide our expert records now instead of letting them expire: trainers stop routing to us at
    their next lookup. ``get_experts`` ignores a value that is not a peer id string, and any server
    of the same uid replaces this marker at its next declaration, whose expiry comes later."""
    until = get_dht_time() + expiration + 0.5
    hidden = {uid: bool(dht.store(uid, b"", until)) for uid in uids}
    # the uid's entry in its grid row's record too (hivemind's prefix records, subkey: the last
    # coordinate), which the swarm's coverage reads: it would count the uid served until it expired
    for uid in uids:
        if uid.count(".") >= 2:
            row, _, coordinate = uid.rpartition(".")
            if coordinate.isdigit():
                dht.store(f"{row}.", b"", until, subkey=int(coordinate))
    return hidden


def read_volunteers(dht: DHT, dht_prefix: str) -> list[VolunteerRecord]:
    """Every volunteer's signed record, from the ``VOLUNTEER_SHARDS`` keys in one bounded DHT call.

    The shards are not fields of the experiment's schema, so the reader checks each value; the
    signature validator refused any subkey ``[owner:K]`` not signed by K, and subkeys naming no owner
    (anyone may write those) are dropped."""
    keys = [f"{dht_prefix}_volunteers.{shard}" for shard in range(VOLUNTEER_SHARDS)]
    found = get_many(dht, keys, latest=True)  # bounded: a dead DHT is an error
    records = []
    for key in keys:
        value = getattr(found.get(key), "value", None)
        for owner, item in value.items() if isinstance(value, dict) else ():
            if not (isinstance(owner, bytes) and owner.startswith(b"[owner:")) or volunteer_key(dht_prefix, owner) != key:
                continue
            try:
                parsed = VolunteerRecordSchema.parse_obj(item.value)
            except (pydantic.ValidationError, TypeError):
                continue
            if parsed.peer_id:
                records.append(VolunteerRecord(parsed.peer_id, tuple(parsed.uids), parsed.device,
                                               parsed.samples_per_second))
    return records


def publish_trainer_progress(dht: DHT, dht_prefix: str, step: int, loss: float) -> bool:
    value = dict(step=int(step), loss=float(loss), time=float(time.time()))
    return bool(dht.store(f"{dht_prefix}_trainer", value, get_dht_time() + RECORD_TTL, subkey=owner_subkey(dht)))


def read_trainer_progress(dht: DHT, dht_prefix: str) -> TrainerProgress | None:
    """The most recent report of any trainer of the experiment."""
    found = get_one(dht, f"{dht_prefix}_trainer", latest=True)  # bounded: a dead DHT is an error
    if found is None or not isinstance(found.value, dict) or not found.value:
        return None
    latest = max((item.value for item in found.value.values()), key=lambda v: v["time"])
    return TrainerProgress(latest["step"], latest["loss"], latest["time"])


@dataclass(frozen=True)
class Contributions:
    """What one trainer run saw each volunteer's experts answer: the swarm's verified work."""

    owner: bytes  # the signed subkey of the trainer that published it
    run: str
    peers: dict[str, tuple[int, int]]  # peer id -> (forward samples, backward samples)
    time: float


def publish_contributions(dht: DHT, dht_prefix: str, run: str, peers: dict[str, tuple[int, int]],
                          ttl: float = RECORD_TTL) -> bool:
    value = dict(run=run, peers={peer: [int(f), int(b)] for peer, (f, b) in peers.items()}, time=float(time.time()))
    return bool(dht.store(f"{dht_prefix}_contributions", value, get_dht_time() + ttl, subkey=owner_subkey(dht)))


def read_contributions(dht: DHT, dht_prefix: str) -> list[Contributions]:
    found = get_one(dht, f"{dht_prefix}_contributions", latest=True)  # bounded: a dead DHT is an error
    if found is None or not isinstance(found.value, dict):
        return []
    return [
        Contributions(owner, item.value["run"], {p: (c[0], c[1]) for p, c in item.value["peers"].items()},
                      item.value["time"])
        for owner, item in found.value.items()
    ]


def key_fingerprint(owner_subkey: bytes) -> str:
    """A short name for a signing key, for people to compare: the first 16 hex digits of the SHA-256
    of the subkey its records are stored under."""
    return hashlib.sha256(owner_subkey).hexdigest()[:16]


def owner_subkey_of(key: RSAPrivateKey) -> bytes:
    """The subkey that records signed by ``key`` are stored under (what a seed trusts)."""
    return RSASignatureValidator(key).local_public_key


@dataclass(frozen=True)
class Caller:
    """A trainer's peer id and the addresses it listens on: what a volunteer behind a NAT dials."""

    peer_id: str
    maddrs: tuple[str, ...]
    time: float


def publish_caller(dht: DHT, dht_prefix: str, peer_id: str, maddrs: Sequence[str], ttl: float = RECORD_TTL) -> bool:
    value = dict(peer_id=peer_id, maddrs=list(maddrs)[:16], time=float(time.time()))
    return bool(dht.store(f"{dht_prefix}_callers", value, get_dht_time() + ttl, subkey=owner_subkey(dht)))


def withdraw_caller(dht: DHT, dht_prefix: str, peer_id: str, ttl: float = RECORD_TTL) -> bool:
    """Replace our caller record with one without addresses (readers skip it); it must outlive the
    record it replaces, as in ``withdraw_volunteer``."""
    value = dict(peer_id=peer_id, maddrs=[], time=float(time.time()))
    return bool(dht.store(f"{dht_prefix}_callers", value, get_dht_time() + ttl + 1.0, subkey=owner_subkey(dht)))


def read_callers(dht: DHT, dht_prefix: str) -> list[Caller]:
    """The trainers that publish where they listen (withdrawn records left out)."""
    found = dht.get(f"{dht_prefix}_callers", latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    return [Caller(item.value["peer_id"], tuple(item.value["maddrs"]), item.value["time"])
            for item in found.value.values() if item.value["maddrs"]]


def publish_reach(dht: DHT, dht_prefix: str, peer_id: str, reachability: str, ttl: float = RECORD_TTL) -> bool:
    value = dict(peer_id=peer_id, reachability=reachability, time=float(time.time()))
    return bool(dht.store(f"{dht_prefix}_reach", value, get_dht_time() + ttl, subkey=owner_subkey(dht)))


def read_reach(dht: DHT, dht_prefix: str) -> dict[str, str]:
    """Volunteer peer id -> how it is reached (``direct``, ``outbound``, ``relayed``, ``unreachable``)."""
    found = dht.get(f"{dht_prefix}_reach", latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    return {item.value["peer_id"]: item.value["reachability"] for item in found.value.values()}
