"""Protobuf stream handlers whose answers the p2p daemon does not cut: hivemind's framing, a graceful end.

Why (read in the daemon's source, learning-at-home/go-libp2p-daemon ``stream.go`` ``doStreamPipe``, with
go-yamux v4.0.1 ``stream.go``, the versions inside hivemind 1.1.12's p2pd): the daemon pipes a stream to
its handler's unix connection with two goroutines. When the handler closes its connection, the copy from
it ends and calls the stream's ``Close()``, which is yamux's ``CloseRead()`` then ``CloseWrite()`` (FIN).
``CloseRead`` wakes the other goroutine, blocked reading the stream (the caller has not closed its side:
hivemind's client reads until the server closes), with ``ErrStreamReset``; that goroutine then calls
``Reset()``. When it gets there before ``CloseWrite`` (a race of a few microseconds, 1-3 streams in 1,000
on loopback), the caller gets RST instead of FIN, and its yamux drops whatever it received but had not yet
passed on to the caller's unix connection: the tail of the answer, or all of it. hivemind's reader takes
that end for a normal one (``IncompleteReadError`` ends the iteration), so the answer just comes back short.

The race needs the server to close while the caller still listens. So the handler here, after its last
message (or its error), waits for the caller to close first, within ``linger`` seconds: a caller that
knows where the answer ends (the trainer's reveal reader) closes at once and nothing can be lost; a caller
that reads until the end (hivemind's own) waits ``linger`` more, which gives the answer time to cross
before a possible reset. Messages go in hivemind's exact framing (``P2P.send_protobuf``: the MESSAGE or
ERROR marker, an 8-byte length, the protobuf; ``END_OF_STREAM`` ends a request stream), so hivemind's
clients (``iterate_protobuf_handler``, ``call_protobuf_handler``, ``RemoteExpert``) call it unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import Any, AsyncIterator, Callable

from google.protobuf.message import Message
from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto.p2pd_pb2 import RPCError

logger = logging.getLogger(__name__)
LINGER = 5.0  # at most this long after the answer for the caller to close first
# ... for callers that read until the server closes (hivemind's client): each pays it on every stream (requests
# above 2 MiB), so short; the answer's bytes go ahead of the reset on the same connection, so what it must
# cover is the caller's daemon passing them on, not the link's delay (50 ms: 0 cut in 5,000 on loopback)
PLAIN_LINGER = 0.05
MAX_PREFETCH = 5  # request messages read ahead of the handler, as hivemind's default


async def add_graceful_stream_handler(p2p: P2P, name: str, handler: Callable[..., Any], input_type: type[Message],
                                      *, stream_input: bool = False, linger: float = LINGER, balanced: bool = False,
                                      on_end: Callable[[bool | None], None] | None = None) -> None:
    """Register ``handler`` (an async generator of response messages, given one request or, with
    ``stream_input``, an async iterator of them, and a ``P2PContext``) as stream ``name`` on ``p2p``: what
    ``p2p.add_protobuf_handler(name, handler, input_type, stream_input=..., stream_output=True)`` would
    serve, ended gracefully (see the module's docstring); ``balanced`` as hivemind's. Removed with
    ``p2p.remove_binary_stream_handler`` (or ``remove_protobuf_handler``, stream flags set).
    ``on_end(closed_first)``, if given, is called as each stream ends: True if the caller closed first after
    the whole answer, False if it was let go after ``linger``, None if the answer did not all go out."""

    async def handle(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=info.peer_id)
        requests: asyncio.Queue = asyncio.Queue(MAX_PREFETCH)
        closed_first = None
        try:
            closed_first = await _serve(handler, stream_input, input_type, context, reader, writer, requests, linger)
        finally:
            writer.close()
            if on_end is not None:
                on_end(closed_first)

    await p2p.add_binary_stream_handler(name, handle, balanced=balanced)


async def _serve(handler, stream_input: bool, input_type: type[Message], context: P2PContext,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: asyncio.Queue,
                 linger: float) -> bool | None:
    """Read requests into the queue while the handler answers; then wait for the caller's close (True if it
    came within ``linger``, False if not; None if the answer did not all go out)."""
    answering = asyncio.create_task(_answer(handler, stream_input, context, writer, requests))
    receiving = asyncio.create_task(_receive(input_type, reader, requests))
    try:
        await asyncio.wait({answering, receiving}, return_when=asyncio.FIRST_COMPLETED)
        if answering.done():
            receiving.cancel()
            if answering.result():  # all was sent: the caller, having it, closes first
                return await _wait_caller_closed(reader, context.handle_name, linger)
        else:  # the caller closed (or sent garbage): stop answering, as hivemind's handler does
            answering.cancel()
        return None
    finally:
        for task in (answering, receiving):
            task.cancel()
        with suppress(BaseException):
            await asyncio.gather(answering, receiving, return_exceptions=True)


async def _receive(input_type: type[Message], reader: asyncio.StreamReader, requests: asyncio.Queue) -> None:
    """Queue the caller's requests until its END_OF_STREAM (queued as None); return when the caller closed."""
    while True:
        try:
            request, _ = await P2P.receive_protobuf(input_type, reader)
        except asyncio.IncompleteReadError:  # the caller closed (or cancelled)
            return
        except Exception as e:  # a request in no known framing: give up on the caller, as hivemind does
            logger.debug(f"unreadable request: {type(e).__name__}: {e}")
            return
        await requests.put(request)  # None for END_OF_STREAM (an RPCError message)
        if request is None:
            await asyncio.Future()  # nothing more is expected: wait here until cancelled


async def _requests(queue: asyncio.Queue) -> AsyncIterator[Message]:
    while (request := await queue.get()) is not None:
        yield request


async def _single(queue: asyncio.Queue) -> Message:
    """The one request of a unary-input stream, as hivemind's ``asingle``: exactly one before the end."""
    first = await queue.get()
    if first is None or await queue.get() is not None:
        raise ValueError("expected exactly one request")
    return first


async def _answer(handler, stream_input: bool, context: P2PContext, writer: asyncio.StreamWriter,
                  requests: asyncio.Queue) -> bool:
    """Send the handler's messages, or its error (as hivemind's handler does); True if all went out."""
    try:
        request = _requests(requests) if stream_input else await _single(requests)
        async for response in handler(request, context):
            try:
                await P2P.send_protobuf(response, writer)
            except Exception:  # the caller went away: it reports its own error
                return False
    except Exception as e:
        logger.debug(f"handler {context.handle_name} failed: {type(e).__name__}: {e}")
        try:
            await P2P.send_protobuf(RPCError(message=str(e)), writer)
        except Exception:
            return False
    return True


async def _wait_caller_closed(reader: asyncio.StreamReader, name: str, linger: float) -> bool:
    """Until the caller's side ends (EOF), discarding anything it still sends, for at most ``linger`` s;
    True if it ended."""
    deadline = time.monotonic() + linger
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not await asyncio.wait_for(reader.read(2**16), left):
                return True
    except asyncio.TimeoutError:
        pass
    except ConnectionError:  # reset rather than closed: it is gone all the same
        return True
    logger.debug(f"{name}: the caller kept its side open for {linger:.1f} s after the answer")
    return False
