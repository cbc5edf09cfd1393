"""The running client's control plane: a Unix socket, owner-only, speaking one JSON line each way.

``volunteer status``, ``stop`` and ``monitor`` (and ``pause``/``resume``) are clients of it. The
socket lives in the platformdirs runtime dir (private, 0700) with mode 0600, and every connection's
peer credentials are checked, so only the user who runs the volunteer can reach it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from volunteer.core.procgroup import is_alive

logger = logging.getLogger(__name__)

SOCKET_NAME = "volunteer.sock"
MAX_MESSAGE = 64 * 1024  # requests are tiny; a status answer with a few hundred experts fits
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(RuntimeError):
    """No client answers, or it answered with an error; the message is one line for the user."""


class NotRunning(ControlError):
    pass


def socket_path(runtime_dir: Path) -> Path:
    return runtime_dir / SOCKET_NAME


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ControlError(f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes; set a shorter "
                           "XDG_RUNTIME_DIR or VOLUNTEER_HOME")


class ControlServer:
    """Serves ``{"command": name, ...}`` requests with the handler registered for ``name``."""

    def __init__(self, path: Path, handlers: dict[str, Handler]):
        _check_length(path)
        self.path, self.handlers = path, handlers  # replaced whole as the client's life goes on
        self.serving = False

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # the caller holds the instance lock, so a socket file here is a dead client's leftover
        self.path.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window in which the socket exists with looser permissions
        try:
            await sock.bind(os.fspath(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        try:
            self.serving = True
            task_status.started(self.path)
            await trio.serve_listeners(self._serve_one, [trio.SocketListener(sock)])
        finally:
            self.serving = False
            self.path.unlink(missing_ok=True)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                if not _same_user(stream.socket):
                    await _send(stream, dict(ok=False, error="permission denied: not the volunteer's user"))
                    return
                with trio.fail_after(10):
                    request = json.loads(await _receive_line(stream))
                if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                    raise ValueError("a request is a JSON object with a string 'command'")
                handler = self.handlers.get(request["command"])
                if handler is None:
                    answer = dict(ok=False, error=f"unknown command {request['command']!r}; "
                                                  f"known: {', '.join(sorted(self.handlers))}")
                else:
                    answer = {"ok": True, **await handler(request)}
                await _send(stream, answer)
            except (ValueError, RecursionError, trio.TooSlowError) as e:
                await _send(stream, dict(ok=False, error=f"bad request: {type(e).__name__}: {e}"[:500]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away; nothing to answer
            except Exception as e:  # a failing command must not take the running volunteer down with it
                logger.warning(f"control command failed: {type(e).__name__}: {e}")
                await _send(stream, dict(ok=False, error=f"the command failed: {type(e).__name__}: {e}"[:500]))


def _same_user(sock: trio.socket.SocketType) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


async def _receive_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"request over {MAX_MESSAGE} bytes")
    return data.split(b"\n", 1)[0]


async def _send(stream: trio.SocketStream, answer: dict[str, Any]) -> None:
    try:
        await stream.send_all(json.dumps(answer).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


# --- the client side: plain blocking sockets, for short CLI commands --------------------------------


def request(path: Path, command: str, timeout: float = 10.0, **arguments: Any) -> dict[str, Any]:
    """Send one command to the running client and return its answer; ControlError on any failure."""
    _check_length(path)
    if not path.exists():
        raise NotRunning(f"no volunteer is running (no control socket at {path})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
            sock.sendall(json.dumps({"command": command, **arguments}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) <= MAX_MESSAGE * 64:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionRefusedError:
            raise NotRunning(f"no volunteer is running: {path} is stale (left by a client that exited)") from None
        except FileNotFoundError:
            raise NotRunning(f"no volunteer is running (no control socket at {path})") from None
        except socket.timeout:
            raise ControlError(f"the volunteer at {path} did not answer in {timeout:.0f} s") from None
        except OSError as e:
            raise ControlError(f"could not reach the volunteer at {path}: {e.strerror or e}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"the volunteer at {path} sent an unreadable answer") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        raise ControlError(str(answer.get("error") if isinstance(answer, dict) else answer))
    return answer


def stop(path: Path, timeout: float = 60.0) -> float:
    """Ask the client to drain and exit, and wait until its process is gone; returns the seconds taken."""
    start = time.monotonic()
    pid = request(path, "stop")["pid"]
    while time.monotonic() - start < timeout:
        if not is_alive(pid):
            return time.monotonic() - start
        time.sleep(0.1)
    raise ControlError(f"the volunteer (pid {pid}) is still draining after {timeout:.0f} s")

