"""``volunteer.core.streams``: the graceful stream handler speaks hivemind's framing to hivemind's own client
(every message, a handler's error as ``P2PHandlerError``, a streamed request), ends as soon as a caller that
knows the answer's end closes, and holds a caller that never closes no longer than its linger. Two bare
hivemind peers (one p2p daemon each) in this process, on 127.0.0.1: about 5 s on two shared cores.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

import pytest
from hivemind.p2p import P2P, P2PContext, P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from volunteer.core.streams import add_graceful_stream_handler

pytestmark = pytest.mark.integration
SHORT, LONG = 0.3, 60.0  # linger for hivemind's readers (they wait it out) / for callers that close first
BOUND = 30.0  # any wait in these tests


async def _three(request: runtime_pb2.ExpertRequest, _context: P2PContext):
    for i in range(3):
        yield runtime_pb2.ExpertResponse(metadata=request.metadata + bytes([i]) * 70_000)


async def _fails_after_one(request: runtime_pb2.ExpertRequest, _context: P2PContext):
    yield runtime_pb2.ExpertResponse(metadata=b"first")
    raise ValueError("no such version here")


async def _counts(requests: AsyncIterator[runtime_pb2.ExpertRequest], _context: P2PContext):
    uids = [request.uid async for request in requests]
    yield runtime_pb2.ExpertResponse(metadata=",".join(uids).encode())


def with_peers(scenario: Callable[[P2P, P2P, asyncio.Queue], Awaitable[None]]) -> None:
    """Run ``scenario(server, client, ended)`` on two fresh peers, the server's handlers registered."""

    async def run() -> None:
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = None
        try:
            client = await P2P.create(initial_peers=await server.get_visible_maddrs())
            ended: asyncio.Queue = asyncio.Queue()  # (name, closed first) as each watched stream ends
            await add_graceful_stream_handler(server, "t.three", _three, runtime_pb2.ExpertRequest, linger=SHORT)
            await add_graceful_stream_handler(server, "t.fails", _fails_after_one, runtime_pb2.ExpertRequest,
                                              linger=SHORT)
            await add_graceful_stream_handler(server, "t.counts", _counts, runtime_pb2.ExpertRequest,
                                              stream_input=True, linger=SHORT)
            for name, linger in (("t.long", LONG), ("t.short", SHORT)):
                await add_graceful_stream_handler(server, name, _three, runtime_pb2.ExpertRequest, linger=linger,
                                                  on_end=lambda closed, name=name: ended.put_nowait((name, closed)))
            await asyncio.wait_for(scenario(server, client, ended), BOUND)
        finally:
            if client is not None:
                await client.shutdown()
            await server.shutdown()

    asyncio.run(run())


def test_hivemind_client_gets_every_message_the_error_and_a_streamed_request() -> None:
    async def scenario(server: P2P, client: P2P, _ended: asyncio.Queue) -> None:
        request = runtime_pb2.ExpertRequest(uid="x", metadata=b"m")
        responses = await client.iterate_protobuf_handler(server.peer_id, "t.three", request,
                                                          runtime_pb2.ExpertResponse)
        assert [r.metadata async for r in responses] == [b"m" + bytes([i]) * 70_000 for i in range(3)]

        responses = await client.iterate_protobuf_handler(server.peer_id, "t.fails", request,
                                                          runtime_pb2.ExpertResponse)
        assert (await responses.__anext__()).metadata == b"first"
        with pytest.raises(P2PHandlerError, match="no such version here"):
            await responses.__anext__()

        requests = as_aiter(*(runtime_pb2.ExpertRequest(uid=f"u{i}") for i in range(7)))
        answer = await client.call_protobuf_handler(server.peer_id, "t.counts", requests, runtime_pb2.ExpertResponse)
        assert answer.metadata == b"u0,u1,u2,u3,u4,u5,u6"

        two = as_aiter(runtime_pb2.ExpertRequest(uid="a"), runtime_pb2.ExpertRequest(uid="b"))
        responses = await client.iterate_protobuf_handler(server.peer_id, "t.three", two, runtime_pb2.ExpertResponse)
        with pytest.raises(P2PHandlerError, match="exactly one request"):
            await responses.__anext__()

    with_peers(scenario)


async def _read_without_closing(client: P2P, server: P2P, name: str):
    """The answer's three messages, read by a caller that keeps its side open; returns its reader and writer."""
    _, reader, writer = await client.call_binary_stream_handler(server.peer_id, name)
    await P2P.send_protobuf(runtime_pb2.ExpertRequest(uid="x", metadata=b"m"), writer)
    await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
    for _ in range(3):
        response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
        assert error is None and len(response.metadata) == 70_001
    return reader, writer


def test_the_handler_ends_when_the_caller_closes_first_and_lets_go_one_that_never_does() -> None:
    async def scenario(server: P2P, client: P2P, ended: asyncio.Queue) -> None:
        _, writer = await _read_without_closing(client, server, "t.long")
        writer.close()  # the caller has all it expected: with a 60 s linger, only this close ends the handler
        assert await ended.get() == ("t.long", True)

        reader, writer = await _read_without_closing(client, server, "t.short")
        try:  # a caller that keeps its side open is let go after the linger: its stream ends
            assert await reader.read(1) == b""
            assert await ended.get() == ("t.short", False)
        finally:
            writer.close()

    with_peers(scenario)
