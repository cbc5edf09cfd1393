"""A coordinator seed: a long-lived DHT peer with a fixed identity that serves the experiment over HTTP.

Volunteers ask a seed (``GET /v1/experiment``, ``GET /v1/peers``) what to serve and whom to bootstrap
from, then talk to the swarm directly. The seed's peer id survives restarts (an identity key file), so
addresses handed out earlier stay valid. It also keeps the leaderboard of verified contributions
(``GET /v1/leaderboard``, see ``leaderboard.py``). HTTP is a starlette app served by hypercorn on trio;
the DHT lives in hivemind's own process and is only touched from worker threads, never the trio thread.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import hypercorn.config
import hypercorn.trio
import trio
from hivemind import DHT
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from coordinator_seeds.leaderboard import Leaderboard
from volunteer.core.expert_records import publish_banned, read_audits
from volunteer.core.manifest import Manifest
from volunteer.core.paths import default_paths
from volunteer.core.records import (
    join_dht,
    key_fingerprint,
    owner_subkey_of,
    read_contributions,
    record_key,
    use_record_key,
    visible_maddrs,
)

logger = logging.getLogger("coordinator_seeds.seed")


TRAINER_KEY = "trainer-key.der"  # coordinator-seed train signs with it by default: the seed trusts it


class SeedError(RuntimeError):
    """The seed cannot start; the message is one line saying why."""


@dataclass(frozen=True)
class SeedSettings:
    manifest: Manifest
    host: str = "127.0.0.1"  # HTTP bind host and DHT host
    http_port: int = 8470
    dht_port: int = 0  # 0 = any free port; production seeds need a fixed one, or their maddrs change
    identity_path: Path | None = None  # default: <data dir>/seed_identity.key
    announce_host: str | None = None
    data_dir: Path | None = None  # identity, trusted trainer key, leaderboard; default: the platform's
    trainer_key_path: Path | None = None  # whose contributions count; default: <data dir>/trainer-key.der
    leaderboard_period: float = 10.0  # seconds between reads of the trainers' records

    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else default_paths("hivemind-coordinator").data_dir

    def resolved_identity_path(self) -> Path:
        return self.identity_path or self.resolved_data_dir() / "seed_identity.key"

    def resolved_trainer_key_path(self) -> Path:
        return self.trainer_key_path or self.resolved_data_dir() / TRAINER_KEY


class Seed:
    def __init__(self, settings: SeedSettings):
        if settings.announce_host is not None and settings.dht_port == 0:
            raise SeedError("announce_host needs a fixed dht_port: a random port cannot be announced")
        self.settings = settings
        self._dht: DHT | None = None
        self._peer_id = ""
        self._maddrs: tuple[str, ...] = ()
        self._started_at = time.monotonic()
        self._http_sock: socket.socket | None = None
        try:
            trusted = owner_subkey_of(record_key(settings.resolved_trainer_key_path()))
            self.leaderboard = Leaderboard(settings.resolved_data_dir() / "leaderboard.json", [trusted])
        except (OSError, ValueError) as e:
            raise SeedError(str(e)) from None

    # --- DHT ---------------------------------------------------------------------------------------

    def start_dht(self) -> None:
        """Blocking (a process start, 1-3 s): call it from a worker thread when inside trio."""
        s = self.settings
        if s.dht_port:
            # p2pd's own failure on a taken port is a slow, multi-line daemon error; check first.
            _check_port_free(s.host, s.dht_port, "DHT")
        identity = s.resolved_identity_path()
        identity.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # the ban list is signed with the project's key, the one trainers and volunteers trust
            use_record_key(s.resolved_trainer_key_path())
            dht = join_dht(s.manifest.dht_prefix, host=s.host, port=s.dht_port, identity_path=identity,
                           announce_host=s.announce_host)
        except Exception as e:  # hivemind raises a zoo of types (P2PDaemonError, ValueError, ...)
            raise SeedError(f"cannot start the DHT on {s.host}:{s.dht_port}: {_first_line(e)}") from e
        self._dht = dht
        # Read once here: the HTTP handlers must never make blocking DHT calls on the trio thread.
        self._peer_id = dht.peer_id.to_base58()
        self._maddrs = tuple(visible_maddrs(dht))
        self._started_at = time.monotonic()
        logger.info("seed DHT peer %s at %s", self._peer_id, ", ".join(self._maddrs))

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def maddrs(self) -> tuple[str, ...]:
        return self._maddrs

    def update_leaderboard(self) -> bool:
        """Blocking: read the trainers' records and add the trusted ones up; saves when anything changed."""
        if self._dht is None:
            return False
        prefix = self.settings.manifest.dht_prefix
        changed = self.leaderboard.merge(read_contributions(self._dht, prefix))
        changed = self.leaderboard.merge_audits(read_audits(self._dht, prefix)) or changed
        if changed:
            self.leaderboard.save()
        self.publish_bans()
        return changed

    def publish_bans(self) -> bool:
        """Blocking: the keys and peers that failed a trusted trainer's audit, signed with the project's
        key (volunteers and trainers trust it, ``/v1/trust``); re-published each period so it never
        expires while the seed runs."""
        keys, peers = self.leaderboard.banned()
        if not keys and not peers:
            return True
        return publish_banned(self._dht, self.settings.manifest.dht_prefix, keys, peers)

    def shutdown(self) -> None:
        """Blocking: stops the DHT process (so the identity is free for a restart) and the HTTP socket."""
        if self._http_sock is not None:
            self._http_sock.close()
            self._http_sock = None
        if self._dht is not None:
            self._dht.shutdown()  # joins, and terminates the process if it outlives the grace period
            self._dht = None

    # --- HTTP --------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        experiment = self.settings.manifest.to_dict()  # immutable: serialize once

        async def get_experiment(request: Request) -> JSONResponse:
            return JSONResponse(experiment)

        async def get_peers(request: Request) -> JSONResponse:
            return JSONResponse({"peer_id": self._peer_id, "maddrs": list(self._maddrs)})

        async def leaderboard(request: Request) -> JSONResponse:
            try:
                limit = max(0, int(request.query_params.get("limit", "100")))
            except ValueError:
                return JSONResponse({"error": "limit must be a whole number"}, status_code=400)
            entries = self.leaderboard.entries()
            answer = {"experiment": self.settings.manifest.name, "volunteers": len(entries)}
            peer = request.query_params.get("peer")
            if peer is not None:  # one volunteer's line and its rank, for its own dashboard
                rank = next((i for i, e in enumerate(entries, 1) if e.peer_id == peer), None)
                return JSONResponse({**answer, "rank": rank, "entries": [entries[rank - 1].to_dict()] if rank else []})
            return JSONResponse({**answer, "entries": [e.to_dict() for e in entries[:limit]]})

        trust = {"trainer_keys": sorted(key_fingerprint(k) for k in self.leaderboard.trusted)}

        async def get_trust(request: Request) -> JSONResponse:
            return JSONResponse(trust)  # a trainer checks it signs with a key this seed counts

        async def healthz(request: Request) -> JSONResponse:
            uptime = round(time.monotonic() - self._started_at, 3)
            return JSONResponse({"ok": self._dht is not None, "peer_id": self._peer_id, "uptime_s": uptime})

        async def dialback(request: Request) -> JSONResponse:
            # only the address the request comes from is dialled: nobody can aim the seed at another host
            host = request.client.host if request.client else ""
            try:
                ports = sorted({int(p) for p in request.query_params.getlist("port")})[:4]
            except ValueError:
                return JSONResponse({"error": "port must be a whole number"}, status_code=400)
            if not host or not all(0 < p < 65536 for p in ports):
                return JSONResponse({"error": "ports must be 1-65535"}, status_code=400)
            opened = [port for port in ports if await _can_connect(host, port)]
            return JSONResponse({"observed_host": host, "open_ports": opened})

        return Starlette(routes=[
            Route("/v1/experiment", get_experiment),
            Route("/v1/dialback", dialback),
            Route("/v1/peers", get_peers),
            Route("/v1/leaderboard", leaderboard),
            Route("/v1/trust", get_trust),
            Route("/healthz", healthz),
        ])

    def bind_http(self) -> int:
        """Bind the HTTP socket now (fails fast with SeedError if taken); returns the bound port."""
        if self._http_sock is None:
            self._http_sock = _bind(self.settings.host, self.settings.http_port, "HTTP")
        return self._http_sock.getsockname()[1]

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve HTTP until cancelled; reports the bound port (useful with ``http_port=0``)."""
        port = self.bind_http()
        assert self._http_sock is not None
        config = hypercorn.config.Config()
        # Hand hypercorn the socket we bound, so the port check and port 0 need no race-prone re-bind.
        config.bind = [f"fd://{self._http_sock.detach()}"]
        self._http_sock = None
        config.accesslog = None
        config.errorlog = logging.getLogger("coordinator_seeds.http")
        config.graceful_timeout = 2.0

        async with trio.open_nursery() as nursery:
            await nursery.start(partial(hypercorn.trio.serve, self.app(), config))
            logger.info("seed HTTP on http://%s:%d", self.settings.host, port)
            nursery.start_soon(self._keep_leaderboard)
            task_status.started(port)

    async def _keep_leaderboard(self) -> None:
        while True:
            await trio.sleep(self.settings.leaderboard_period)
            try:  # a DHT call blocks for ever if the DHT process is gone: never wait on it at shutdown
                await trio.to_thread.run_sync(self.update_leaderboard, abandon_on_cancel=True)
            except Exception as e:  # one failed read or write must not stop the seed
                logger.warning("leaderboard update failed: %s", _first_line(e))


async def run_seed(settings: SeedSettings, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Start the DHT, serve HTTP until cancelled, always stop the DHT. Reports the HTTP port."""
    seed = Seed(settings)
    seed.bind_http()  # before the DHT: a taken port should fail in milliseconds, not after a DHT start
    try:
        # On this thread, not a trio worker: the DHT child dies with the thread that forked it
        # (PR_SET_PDEATHSIG, see volunteer.core.procgroup), and trio retires idle workers within seconds.
        seed.start_dht()
        await seed.serve(task_status=task_status)
    finally:
        with trio.CancelScope(shield=True):  # shutdown must finish even though we are being cancelled
            await trio.to_thread.run_sync(seed.shutdown)


# --- helpers -------------------------------------------------------------------------------------

DIAL_BACK_TIMEOUT = 3.0  # a port behind a NAT with no forward is dropped (no answer) or refused (at once)


async def _can_connect(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``DIAL_BACK_TIMEOUT`` (then closed at once)."""
    with trio.move_on_after(DIAL_BACK_TIMEOUT):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False



def _bind(host: str, port: int, what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR: a restart must not fail on the previous run's TIME_WAIT connections; on Linux
    # it still refuses a port that another socket is listening on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise SeedError(f"{what} port {port} is already in use on {host}") from None
        raise SeedError(f"cannot bind {what} port {port} on {host}: {e.strerror}") from None
    return sock


def _check_port_free(host: str, port: int, what: str) -> None:
    _bind(host, port, what).close()  # racy by nature, but catches the common "seed already running"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
