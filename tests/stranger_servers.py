"""Servers for the strangers tests, each a real process of its own: honest volunteers (audited backends,
signed records, the reveal service), four kinds of cheaters, and a plain hivemind peer that hijacks
an honest volunteer's uids in hivemind's unsigned records.

Volunteers and cheaters serve on the lean path (``serving.handler.LeanServer``, the client's default)
unless ``serving="hivemind"`` (hivemind's ``Server`` and TaskPools); the hijacker is plain hivemind."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Iterator

import torch
from hivemind.moe import ModuleBackend, Server, declare_experts
from hivemind.utils import get_dht_time

from tests.forkserver import server_context
from volunteer.core import records, wire
from volunteer.core.expert_modules import build_expert, build_optimizer
from volunteer.core.expert_records import publish_servers, withdraw_servers
from volunteer.serving.backends import initial_seed, wire_schemas
from volunteer.serving.counters import ExpertCounters
from volunteer.serving.handler import LeanServer
from volunteer.serving.versions import AuditedBackend, RevealService

PREFIX = "tstrange"
D_MODEL, D_HIDDEN, BLOCK, LR = 16, 32, "residual_ffn", 1e-3
RECORD_LIFE, ANNOUNCE_EVERY = 15.0, 5.0  # seconds


class ZerosBackend(AuditedBackend):
    """Answers zeros of the right shape, committed like an honest answer."""

    def _committed_forward(self, *inputs, parts=None):
        output, commits = super()._committed_forward(*inputs, parts=parts)
        return torch.zeros_like(output), commits


class RandomBackend(AuditedBackend):
    """Answers random values at the scale of an honest answer (never computes what it sends)."""

    def _committed_forward(self, *inputs, parts=None):
        output, commits = super()._committed_forward(*inputs, parts=parts)
        return torch.randn_like(output) * output.std() + output.mean(), commits


class FrozenBackend(AuditedBackend):
    """Computes correctly with weights that never train: backward skips the optimizer step."""

    def on_backward(self, batch_size: int) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad()


class WrongOneInTenBackend(AuditedBackend):
    """Honest, except every tenth forward answer, which is random."""

    calls = 0

    def _committed_forward(self, *inputs, parts=None):
        output, commits = super()._committed_forward(*inputs, parts=parts)
        self.calls += 1
        if self.calls % 10 == 0:
            output = torch.randn_like(output) * output.std()
        return output, commits


KINDS = {"honest": AuditedBackend, "zeros": ZerosBackend, "random": RandomBackend, "frozen": FrozenBackend,
         "wrong1in10": WrongOneInTenBackend}


def _backend(kind: str, uid: str, pools: bool, wire_dtype: str = "float32") -> ModuleBackend:
    module = build_expert(BLOCK, D_MODEL, D_HIDDEN, seed=initial_seed(uid))
    optimizer = build_optimizer("adam", module.parameters(), lr=LR)
    schema, outputs = wire_schemas(module, torch.empty(1, D_MODEL), wire.compression(wire_dtype))  # as volunteers do
    if kind == "hijack":  # a plain hivemind expert that answers zeros: no commitment, no signed record
        return ModuleBackend(name=uid, module=_Zeros(), optimizer=None, args_schema=schema, max_batch_size=4096)
    return KINDS[kind](uid, module, optimizer=optimizer, expert_type="small",
                       counters=ExpertCounters(uid, "small"), args_schema=schema, outputs_schema=outputs,
                       min_batch_size=1, max_batch_size=4096, pools=pools)


class _Zeros(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _serve(conn: Connection, initial_peers: list[str], uids: list[str], kind: str, key_path: str,
           samples_per_second: float, serving: str, wire_dtype: str) -> None:
    os.setsid()  # its own process group: the test kills everything it started at once
    records.use_record_key(Path(key_path))
    torch.set_num_threads(1)
    dht = records.join_dht(PREFIX, initial_peers)
    lean = serving == "lean" and kind != "hijack"
    backends = {uid: _backend(kind, uid, pools=not lean, wire_dtype=wire_dtype) for uid in uids}
    if lean:
        server = LeanServer(dht, backends, [("cpu", uids)], update_period=5)
        server.run_in_background(timeout=60)
    else:
        server = Server(dht, backends, num_connection_handlers=1, update_period=5, start=True)
    reveal = None
    peer_id = dht.peer_id.to_base58()

    def announce() -> None:
        publish_servers(dht, PREFIX, uids, peer_id=peer_id, device="cpu", samples_per_second=samples_per_second,
                        ttl=RECORD_LIFE)
    try:
        if kind == "hijack":  # hivemind's records, expiring long after the honest volunteer's
            declare_experts(dht, uids, expiration_time=get_dht_time() + 600)
        else:
            reveal = RevealService(dht, backends, server.handler.workers if lean else None)
            reveal.run_in_background()
            announce()
        conn.send(peer_id)
        announced = time.monotonic()
        while True:
            if reveal is not None and time.monotonic() - announced > ANNOUNCE_EVERY:
                announce()  # a short life: a killed server's records are gone before the next test looks
                announced = time.monotonic()
            if conn.poll(1.0):
                command = conn.recv()
                if command == "stop":
                    if reveal is not None:  # as a volunteer leaves: its records say paused at once
                        withdraw_servers(dht, PREFIX, uids)
                    break
                if command == "memory":
                    conn.send({uid: b.versions.memory_bytes() for uid, b in backends.items()
                               if hasattr(b, "versions")})
    except EOFError:
        pass
    finally:
        if reveal is not None:
            reveal.shutdown()
        server.shutdown()


class StrangerServer:
    def __init__(self, initial_peers: list[str], uids: list[str], kind: str, key_path: Path,
                 samples_per_second: float = 100.0, serving: str = "lean", wire_dtype: str = "float32"):
        context = server_context()
        self.uids, self.kind = uids, kind
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, initial_peers, uids, kind, str(key_path),
                                                             samples_per_second, serving, wire_dtype))
        self.process.start()
        child.close()
        self.peer_id = ""

    def wait_ready(self, timeout: float = 90.0) -> StrangerServer:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"the {self.kind} server of {self.uids} did not start within {timeout} s")
        self.peer_id = self._conn.recv()
        return self

    def memory(self) -> dict[str, int]:
        self._conn.send("memory")
        if not self._conn.poll(30):
            raise TimeoutError("no memory figures within 30 s")
        return self._conn.recv()

    def kill(self) -> None:
        """SIGKILL the whole process group: handlers, DHT and p2pd die with it, mid-call."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=10)

    def ask_to_stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send("stop")

    def stop(self) -> None:
        self.ask_to_stop()
        self.process.join(timeout=20)
        self.kill()


@contextlib.contextmanager
def running(*servers: StrangerServer) -> Iterator[list[StrangerServer]]:
    try:
        yield [s.wait_ready() for s in servers]
    finally:
        for server in servers:  # all at once: each withdraws its records and shuts down in parallel
            server.ask_to_stop()
        for server in servers:
            server.stop()

