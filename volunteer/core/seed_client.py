"""The client's view of a coordinator: fetch the experiment and bootstrap peers, or fall back to a cache.

Everything that arrives is treated as hostile data: bodies are size-capped while streaming, parsed as
JSON only (nothing is unpickled or executed), and validated (``Manifest.from_dict``, a multiaddr
shape check) before use. Transient failures (connection errors, timeouts, 5xx) are retried with
backoff; a wrong answer (4xx, HTML, bad JSON, invalid manifest) is not, since asking again will not
fix it. The last good answer is cached per URL so a volunteer can restart while the coordinator is down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx

from volunteer.core.maddrs import check_maddr
from volunteer.core.manifest import Manifest, ManifestError, load
from volunteer.core.paths import write_atomic

logger = logging.getLogger("volunteer.core.seed_client")

MAX_BODY_BYTES = 1024 * 1024
MAX_PEERS = 64
_RETRY_STATUS = {408, 429}  # 4xx codes that mean "later", unlike the rest of 4xx


class CoordinatorError(RuntimeError):
    """No experiment could be had; the message is one line saying why."""


@dataclass(frozen=True)
class Experiment:
    manifest: Manifest
    initial_peers: tuple[str, ...]
    source: str  # "coordinator" | "cache" | "file"


class _Transient(Exception):
    """Worth another attempt: the coordinator may be restarting or overloaded."""


class _Invalid(Exception):
    """The coordinator answered, wrongly; retrying will not help."""


def fetch_experiment(
    url: str,
    cache_dir: Path,
    *,
    attempts: int = 4,
    timeout: float = 5.0,
    backoff: float = 0.5,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Experiment:
    """Blocking: run it before trio starts or via ``trio.to_thread.run_sync``."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    base = _base_url(url)
    cache = cache_path(cache_dir, url)
    try:
        experiment = _fetch_with_retries(base, attempts, timeout, backoff, transport, sleep)
    except (_Transient, _Invalid) as e:
        return _from_cache(url, cache, failure=_failure_text(url, attempts, e))
    _write_cache(cache, url, experiment)
    return experiment


def experiment_from_file(path: Path, initial_peers: Sequence[str]) -> Experiment:
    """An experiment given by hand (``--manifest`` and ``--peer``), checked like a fetched one."""
    try:
        peers = _check_peers(list(initial_peers))
    except _Invalid as e:
        raise CoordinatorError(f"initial peers: {e}") from None
    return Experiment(load(path), peers, "file")


def cache_path(cache_dir: Path, url: str) -> Path:
    return Path(cache_dir) / f"experiment-{hashlib.sha1(url.encode()).hexdigest()[:12]}.json"


# --- network -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """This volunteer's line of the coordinator's leaderboard: what its trusted trainers saw it answer."""

    forward_samples: int
    backward_samples: int
    rank: int | None  # 1 = most samples; None until a trainer has seen it answer
    volunteers: int  # on the leaderboard
    audited: int = 0  # of its calls, how many the trainers audited and how many passed (issue 14)
    passed: int = 0
    banned: bool = False  # it failed an audit: no credit, no calls


def fetch_verified(url: str, peer_id: str, *, timeout: float = 5.0,
                   transport: httpx.BaseTransport | None = None) -> Verified:
    """One try, no cache (callers poll): a failure raises ``CoordinatorError`` and only means no news."""
    base = _base_url(url)
    try:
        with httpx.Client(transport=transport, timeout=timeout, follow_redirects=True, max_redirects=3) as client:
            body = _get_json(client, base.join("v1/leaderboard").copy_merge_params({"peer": peer_id}), timeout)
        entries, volunteers, rank = body["entries"], body["volunteers"], body.get("rank")
        if not (isinstance(entries, list) and len(entries) <= 1 and _count(volunteers)
                and (rank is None or _count(rank))):
            raise _Invalid("a malformed leaderboard")
        forward, backward = (entries[0]["forward_samples"], entries[0]["backward_samples"]) if entries else (0, 0)
        if not (_count(forward) and _count(backward)):
            raise _Invalid("a malformed leaderboard entry")
        audited, passed, banned = ((entries[0].get("audited", 0), entries[0].get("passed", 0),
                                    entries[0].get("banned", False)) if entries else (0, 0, False))
        if not (_count(audited) and _count(passed) and isinstance(banned, bool)):
            raise _Invalid("a malformed leaderboard entry")
    except (_Transient, _Invalid) as e:
        raise CoordinatorError(f"no leaderboard from {url}: {e}") from None
    except (TypeError, KeyError, IndexError):
        raise CoordinatorError(f"no leaderboard from {url}: a malformed answer") from None
    return Verified(forward, backward, rank, volunteers, audited, passed, banned)


def fetch_trusted_trainer_keys(url: str, *, timeout: float = 5.0,
                               transport: httpx.BaseTransport | None = None) -> tuple[str, ...]:
    """Fingerprints (``records.key_fingerprint``) of the trainer keys whose records the seed counts."""
    base = _base_url(url)
    try:
        with httpx.Client(transport=transport, timeout=timeout, follow_redirects=True, max_redirects=3) as client:
            keys = _get_json(client, base.join("v1/trust"), timeout)["trainer_keys"]
        if not (isinstance(keys, list) and len(keys) <= MAX_PEERS and all(isinstance(k, str) and len(k) <= 64
                                                                           for k in keys)):
            raise _Invalid("a malformed list of trusted keys")
    except (_Transient, _Invalid) as e:
        raise CoordinatorError(f"no trusted keys from {url}: {e}") from None
    except (TypeError, KeyError):
        raise CoordinatorError(f"no trusted keys from {url}: a malformed answer") from None
    return tuple(keys)


@dataclass(frozen=True)
class DialBack:
    """The seed's answer to "can you dial me?": our address as it saw it, and which ports it could open."""

    observed_host: str
    open_ports: tuple[int, ...]


def dial_back(url: str, ports: Sequence[int], *, timeout: float = 15.0,
              transport: httpx.BaseTransport | None = None) -> DialBack:
    """Ask the seed at ``url`` to open a TCP connection to ``ports`` at the address our request comes
    from (``GET /v1/dialback``): a port it opens is one any trainer can dial."""
    base = _base_url(url)
    query = "&".join(f"port={int(port)}" for port in list(ports)[:4])
    try:
        with httpx.Client(transport=transport, timeout=timeout, follow_redirects=False) as client:
            answer = _get_json(client, base.join(f"v1/dialback?{query}"), timeout)
        host, opened = answer["observed_host"], answer["open_ports"]
        if not (isinstance(host, str) and len(host) <= 64 and isinstance(opened, list)
                and len(opened) <= 4 and all(type(p) is int for p in opened)):
            raise _Invalid("a malformed dial-back answer")
    except (_Transient, _Invalid) as e:
        raise CoordinatorError(f"no dial-back from {url}: {e}") from None
    except (TypeError, KeyError):
        raise CoordinatorError(f"no dial-back from {url}: a malformed answer") from None
    return DialBack(host, tuple(opened))


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _base_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise CoordinatorError(f"coordinator URL {url!r} is invalid: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CoordinatorError(f"coordinator URL {url!r} must be http:// or https:// with a host")
    return parsed.copy_with(path=parsed.path.rstrip("/") + "/", query=None, fragment=None)


def _fetch_with_retries(
    base: httpx.URL, attempts: int, timeout: float, backoff: float,
    transport: httpx.BaseTransport | None, sleep: Callable[[float], None],
) -> Experiment:
    with httpx.Client(transport=transport, timeout=timeout, follow_redirects=True, max_redirects=3) as client:
        for attempt in range(attempts):
            try:
                return _fetch_once(client, base, timeout)
            except _Transient as e:
                if attempt == attempts - 1:
                    raise
                # Exponential backoff with jitter, so a fleet of volunteers does not retry in lockstep.
                delay = backoff * 2**attempt * random.uniform(0.5, 1.0)
                logger.info("coordinator %s: %s; retrying in %.1f s", base, e, delay)
                sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _fetch_once(client: httpx.Client, base: httpx.URL, timeout: float) -> Experiment:
    try:
        manifest = Manifest.from_dict(_get_json(client, base.join("v1/experiment"), timeout))
    except ManifestError as e:
        raise _Invalid(f"an invalid experiment: {e}") from None
    peers_body = _get_json(client, base.join("v1/peers"), timeout)
    if not isinstance(peers_body, dict):
        raise _Invalid("an invalid peer list: not a JSON object")
    return Experiment(manifest, _check_peers(peers_body.get("maddrs")), "coordinator")


def _get_json(client: httpx.Client, url: httpx.URL, timeout: float) -> Any:
    body = _get_bounded(client, url, timeout)
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, 4300+ digit ints, deep nesting
        kind = "HTML" if body.lstrip()[:1] == b"<" else "invalid JSON"
        raise _Invalid(f"{kind} from {url.path} ({str(e).splitlines()[0]})") from None


def _get_bounded(client: httpx.Client, url: httpx.URL, timeout: float) -> bytes:
    """GET with the body capped at MAX_BODY_BYTES and the whole exchange at ``timeout`` (httpx's
    timeouts are per read, so a server dripping one byte at a time would otherwise never time out)."""
    deadline = time.monotonic() + timeout
    try:
        with client.stream("GET", url) as response:
            _check_status(response, url)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                raise _Invalid(f"a {declared}-byte body from {url.path}, more than {MAX_BODY_BYTES} allowed")
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _Invalid(f"a body from {url.path} larger than {MAX_BODY_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise _Transient("timed out")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException:
        raise _Transient("timed out") from None
    except httpx.TransportError as e:
        raise _Transient(_transport_reason(e)) from None
    except httpx.RequestError as e:  # too many redirects, a body that fails to decompress
        raise _Invalid(f"a broken answer from {url.path} ({_one_line(e)})") from None


def _check_status(response: httpx.Response, url: httpx.URL) -> None:
    code = response.status_code
    if code >= 500 or code in _RETRY_STATUS:
        raise _Transient(f"HTTP {code} from {url.path}")
    if code != 200:
        raise _Invalid(f"HTTP {code} from {url.path}")


def _transport_reason(e: httpx.TransportError) -> str:
    """'[Errno 111] Connection refused' -> 'connection refused', for a one-line message."""
    return re.sub(r"^\[Errno -?\d+\]\s*", "", _one_line(e)).lower()


def _check_peers(maddrs: Any) -> tuple[str, ...]:
    if not isinstance(maddrs, list) or not maddrs:
        raise _Invalid("an invalid peer list: maddrs must be a non-empty list")
    if len(maddrs) > MAX_PEERS:
        raise _Invalid(f"an invalid peer list: {len(maddrs)} peers, at most {MAX_PEERS}")
    try:
        return tuple(check_maddr(maddr) for maddr in maddrs)
    except ValueError as e:
        raise _Invalid(f"an invalid peer list: {e}") from None


def _failure_text(url: str, attempts: int, e: Exception) -> str:
    if isinstance(e, _Transient):
        return f"coordinator {url} unreachable after {attempts} attempts ({e})"
    return f"coordinator {url} sent {e}"


# --- cache ---------------------------------------------------------------------------------------


def _write_cache(path: Path, url: str, experiment: Experiment) -> None:
    """Atomic (tmp file, fsync, rename): a crash mid-write must never leave a half-written cache."""
    record = {"url": url, "manifest": experiment.manifest.to_dict(),
              "initial_peers": list(experiment.initial_peers), "fetched_at": time.time()}
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(json.dumps(record, sort_keys=True).encode()))
    except OSError as e:  # a cache is a convenience: a full disk must not fail a good fetch
        logger.warning("could not cache the experiment at %s: %s", path, e.strerror or e)


def _from_cache(url: str, path: Path, *, failure: str) -> Experiment:
    if not path.exists():
        raise CoordinatorError(f"{failure} and no cached experiment")
    try:
        experiment, fetched_at = _read_cache(path)
    except (OSError, ValueError, RecursionError, _Invalid) as e:  # ManifestError, JSONDecodeError: ValueErrors
        # Left in place on purpose: it may be worth a look, and the next good fetch replaces it.
        raise CoordinatorError(f"{failure} and the cached experiment {path} is corrupt ({_one_line(e)})") from None
    age = time.time() - fetched_at
    logger.warning("%s; using the experiment cached %.0f s ago at %s", failure, age, path)
    return experiment


def _read_cache(path: Path) -> tuple[Experiment, float]:
    if path.stat().st_size > MAX_BODY_BYTES:
        raise ValueError("file too large")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("fetched_at"), (int, float)):
        raise ValueError("not a cache record")
    manifest = Manifest.from_dict(data.get("manifest"))
    return Experiment(manifest, _check_peers(data.get("initial_peers")), "cache"), float(data["fetched_at"])


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
