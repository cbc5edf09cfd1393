"""Streams the p2p daemons cut: hivemind's stream handler vs ``volunteer.core.streams``' graceful one.

Two bare hivemind peers on 127.0.0.1 (``P2P.create``, one daemon each): a server in a child process and
a client here. The server's handler answers one request with ``--messages`` messages of ``--size`` bytes,
registered three ways: hivemind's ``add_protobuf_handler(stream_output=True)`` (today), and
``add_graceful_stream_handler`` with a long linger (5 s) and a short one (``--short-linger``). The client
calls each ``--streams`` times, ``--parallel`` at once, in alternating rounds, reading either as hivemind's
client does (``iterate_protobuf_handler``: until the server closes) or as the trainer's reveal reader does
now (the announced number of messages, then it closes first). A stream is cut when fewer messages or
bytes than sent arrive. Each case's figure is cuts per 10,000 streams, with the rounds' spread.

It also counts the resets the client's daemon saw (its ``doStreamPipe`` logs ``stream error: stream
reset`` at debug level when the stream it reads is reset; ``GOLOG_LOG_LEVEL=p2pd=debug``). Where the server
closes first, that is the number of streams on which the server's daemon sent RST rather than FIN: the
race ``volunteer.core.streams`` describes. (Where the client closes first its own daemon resets the stream
it stops reading, every time, so those cases' counts say nothing about the server.)

    .venv/bin/python -m bench.stream_cuts [--streams 5000] [--parallel 8] [--messages 3] [--size 8192] [--rounds 5]
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.multiaddr import Multiaddr

from bench._common import (
    bench_args,
    kill_descendants,
    machine_line,
    median,
    print_key,
    print_table,
)
from volunteer.core.streams import add_graceful_stream_handler

TODAY, GRACEFUL, GRACEFUL_SHORT = "cuts.today", "cuts.graceful", "cuts.graceful_short"
CALL_TIMEOUT = 30.0  # one stream; a stream over it counts as timed out, not cut
# (handler, reader): hivemind's handler read as hivemind reads; the same read by a caller that closes
# first (shows the caller's close alone does not help); the graceful handler with each reader
CASES = [(TODAY, "hivemind"), (TODAY, "closes"), (GRACEFUL, "closes"), (GRACEFUL_SHORT, "hivemind")]


async def answer(request: runtime_pb2.ExpertRequest, _context: P2PContext):
    count, size = MSGPackSerializer.loads(request.metadata)
    payload = bytes(size)
    for _ in range(count):
        yield runtime_pb2.ExpertResponse(metadata=payload)


async def serve(short_linger: float) -> None:
    """The child: one peer with the three handlers; prints its address, serves until stdin closes."""
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        await p2p.add_protobuf_handler(TODAY, answer, runtime_pb2.ExpertRequest, stream_output=True)
        await add_graceful_stream_handler(p2p, GRACEFUL, answer, runtime_pb2.ExpertRequest)
        await add_graceful_stream_handler(p2p, GRACEFUL_SHORT, answer, runtime_pb2.ExpertRequest,
                                          linger=short_linger)
        maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
        print(json.dumps({"peer": p2p.peer_id.to_base58(), "maddrs": maddrs}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await p2p.shutdown()


class ResetCounter(logging.Handler):
    """The client daemon's ``stream error`` lines, which hivemind relays to its p2p_daemon logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "stream error: stream reset":  # not "use of closed network connection"
            self.count += 1

    @classmethod
    def installed(cls) -> ResetCounter:
        os.environ["GOLOG_LOG_LEVEL"] = "error,p2pd=debug"  # read by P2P.create for its daemon
        daemon_log = logging.getLogger("hivemind.p2p.p2p_daemon")
        daemon_log.setLevel(logging.DEBUG)
        daemon_log.propagate = False  # counted, not printed
        counter = cls()
        daemon_log.addHandler(counter)
        return counter


@dataclass
class Tally:
    streams: int = 0
    cut: int = 0
    resets: int = 0
    timed_out: int = 0
    failed: int = 0
    seconds: list[float] = field(default_factory=list)  # per stream
    per_round: list[float] = field(default_factory=list)  # cuts per 10,000, each round

    def per_10k(self) -> float:
        return 1e4 * self.cut / self.streams if self.streams else float("nan")


async def read_as_hivemind(p2p: P2P, peer: PeerID, name: str, request) -> tuple[int, int]:
    count = size = 0
    async for response in await p2p.iterate_protobuf_handler(peer, name, request, runtime_pb2.ExpertResponse):
        count, size = count + 1, size + len(response.metadata)
    return count, size


async def read_then_close(p2p: P2P, peer: PeerID, name: str, request, expected: int) -> tuple[int, int]:
    """The trainer's way: read the messages it knows are coming, then close its side first."""
    _, reader, writer = await p2p.call_binary_stream_handler(peer, name)
    count = size = 0
    try:
        await P2P.send_protobuf(request, writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        while count < expected:
            try:
                response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
            except asyncio.IncompleteReadError:
                break
            if error is not None:
                raise RuntimeError(error.message)
            count, size = count + 1, size + len(response.metadata)
    finally:
        writer.close()
    return count, size


async def one_round(p2p: P2P, peer: PeerID, case: tuple[str, str], streams: int, parallel: int,
                    messages: int, size: int, tally: Tally, resets: ResetCounter) -> None:
    name, reader = case
    request = runtime_pb2.ExpertRequest(uid="bench", metadata=MSGPackSerializer.dumps((messages, size)))
    gate = asyncio.Semaphore(parallel)
    cut_before, resets_before = tally.cut, resets.count

    async def call() -> None:
        async with gate:
            start = time.perf_counter()
            try:
                if reader == "hivemind":
                    read = read_as_hivemind(p2p, peer, name, request)
                else:
                    read = read_then_close(p2p, peer, name, request, messages)
                count, got = await asyncio.wait_for(read, CALL_TIMEOUT)
            except asyncio.TimeoutError:
                tally.timed_out += 1
                return
            except Exception as e:
                tally.failed += 1
                print(f"  {name}/{reader}: {type(e).__name__}: {e}", file=sys.stderr)
                return
            finally:
                tally.streams += 1
            tally.seconds.append(time.perf_counter() - start)
            if count < messages or got < messages * size:
                tally.cut += 1

    await asyncio.gather(*(call() for _ in range(streams)))
    await asyncio.sleep(0.5)  # the daemon's last log lines arrive
    tally.resets += resets.count - resets_before
    tally.per_round.append(1e4 * (tally.cut - cut_before) / streams)


async def drive(args, peer_id: str, maddrs: list[str]) -> dict[tuple[str, str], Tally]:
    peer = PeerID.from_base58(peer_id)
    resets = ResetCounter.installed()
    p2p = await P2P.create(initial_peers=[Multiaddr(f"{maddrs[0]}/p2p/{peer_id}")])
    tallies = {case: Tally() for case in CASES}
    try:
        per_round = max(1, args.streams // args.rounds)
        for r in range(args.rounds):
            cases = CASES if r % 2 == 0 else CASES[::-1]  # alternate the order: no case always goes first
            for case in cases:
                await one_round(p2p, peer, case, per_round, args.parallel, args.messages, args.size, tallies[case],
                                resets)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n}/{rd} {t.cut}" for (n, rd), t in tallies.items()), flush=True)
    finally:
        await p2p.shutdown()
    return tallies


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=5000, help="streams per case, all rounds together")
    parser.add_argument("--parallel", type=int, default=8, help="streams open at once")
    parser.add_argument("--messages", type=int, default=3, help="messages in one answer")
    parser.add_argument("--size", type=int, default=8192, help="bytes in one message")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--short-linger", type=float, default=0.05,
                        help="the second graceful handler's wait for a caller that never closes first")
    parser.add_argument("--serve", action="store_true", help=argparse_hidden())
    args = parser.parse_args()
    if min(args.streams, args.parallel, args.messages, args.rounds) < 1 or args.size < 0:
        parser.error("--streams, --parallel, --messages and --rounds must be at least 1, --size at least 0")
    if args.serve:
        asyncio.run(serve(args.short_linger))
        return

    print(machine_line())
    server = subprocess.Popen([sys.executable, "-m", "bench.stream_cuts", "--serve",
                               "--short-linger", str(args.short_linger)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = server.stdout.readline()  # the child's P2P.create has its own 15 s start-up bound
        if not line:
            raise SystemExit("the server peer did not start")
        address = json.loads(line)
        started = time.perf_counter()
        tallies = asyncio.run(drive(args, address["peer"], address["maddrs"]))
        wall = time.perf_counter() - started
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        left = kill_descendants()
        if left:
            print(f"killed leftovers: {' '.join(left)}", file=sys.stderr)

    rows = []
    for (name, reader), t in tallies.items():
        rounds = sorted(t.per_round)
        rows.append([name.split(".")[1], reader, t.streams, t.cut, t.timed_out, t.failed, t.per_10k(),
                     f"{rounds[0]:.0f}-{rounds[-1]:.0f}", t.resets, 1e3 * median(t.seconds)])
    print_table(f"{args.messages} messages of {args.size} bytes a stream, {args.parallel} streams at once "
                f"({wall:.0f} s in all)",
                ["handler", "reader", "streams", "cut", "timed out", "failed", "cut/10k", "rounds' range",
                 "client resets", "median ms"], rows)
    key = {f"{name.split('.')[1]}_{reader}_per10k": t.per_10k() for (name, reader), t in tallies.items()}
    print_key("stream_cuts", key)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
