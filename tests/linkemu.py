"""A cable with delay, jitter and loss, for the network lab: lab equipment, not part of the product.

These kernels have no ``netem``. This moves Ethernet frames between two interfaces of one namespace
(``AF_PACKET`` sockets, so ARP and everything else pass too) through a delay queue: each direction is
FIFO (jitter never reorders, as a real cable's does not), each frame waits ``delay`` plus a uniform
``[0, jitter]``, and a fraction ``loss`` is dropped. The namespace it runs in has no addresses and no
forwarding, so this process is the only way across.

    python linkemu.py IF_A IF_B --delay 0.02 [--jitter 0.002] [--loss 0.01]

Two kernel shortcuts must be undone for frames to survive a trip through user space: frames bigger
than the MTU cannot be written back out (the lab sets ``gso_max_segs 1`` on every interface, so no one
hands a 64 KiB TCP super-frame to the cable), and a veth leaves TCP/UDP checksums to a "hardware" that
never computes them (checksum offload): this fills them in for IPv4 before a frame goes on.
"""

from __future__ import annotations

import argparse
import array
import heapq
import os
import random
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # our own writes, seen again on the interface we wrote to


def _sum16(data: bytes) -> int:
    """Ones' complement sum in native byte order (so the result is stored natively, no swaps)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(array.array("H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def fill_checksum(frame: bytes) -> bytes:
    """``frame`` with its IPv4 TCP or UDP checksum computed (what checksum offload left undone)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] not in (6, 17):
        return frame
    ihl = (frame[14] & 0x0F) * 4
    total = int.from_bytes(frame[16:18], "big")
    start, end = 14 + ihl, 14 + total
    at = start + (16 if frame[23] == 6 else 6)
    if end > len(frame) or at + 2 > end or (frame[23] == 17 and frame[at:at + 2] == b"\0\0"):
        return frame  # truncated, or a UDP datagram that carries no checksum
    segment = bytearray(frame[start:end])
    segment[at - start:at - start + 2] = b"\0\0"
    pseudo = frame[26:34] + bytes((0, frame[23])) + (end - start).to_bytes(2, "big")
    checksum = ~_sum16(pseudo + bytes(segment)) & 0xFFFF
    if frame[23] == 17 and checksum == 0:
        checksum = 0xFFFF
    return frame[:at] + array.array("H", [checksum]).tobytes() + frame[at + 2:]


def open_port(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


def run(a: str, b: str, delay: float, jitter: float, loss: float, seed: int | None = None) -> None:
    rng = random.Random(seed)
    ports = {a: open_port(a), b: open_port(b)}
    other = {ports[a].fileno(): ports[b], ports[b].fileno(): ports[a]}
    by_fd = {sock.fileno(): sock for sock in ports.values()}
    queue: list[tuple[float, int, socket.socket, bytes]] = []  # (release time, order, out, frame)
    last_release = {fd: 0.0 for fd in by_fd}  # per direction: FIFO
    order = 0
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    print("linkemu ready", flush=True)
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 1.0
        for fd, _ in poller.poll(timeout * 1000):
            sock = by_fd[fd]
            while True:
                try:
                    frame, address = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING or (loss and rng.random() < loss):
                    continue
                now = time.monotonic()
                release = max(now + delay + (rng.uniform(0, jitter) if jitter else 0.0), last_release[fd])
                last_release[fd] = release
                order += 1
                heapq.heappush(queue, (release, order, other[fd], fill_checksum(frame)))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
            except OSError as e:  # a full queue or an oversized frame: a cable would drop it too
                print(f"linkemu dropped a {len(frame)}-byte frame: {e}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds, each direction")
    parser.add_argument("--jitter", type=float, default=0.0, help="seconds, uniform, added to the delay")
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of frames dropped")
    args = parser.parse_args()
    # A cable is not a CPU job: ahead of the peers it carries when the cores are busy (a test next to
    # it, or the peers themselves), or their load shows up as extra delay (133 ms measured for 100 ms
    # asked, next to another test's swarm). The lab runs as root, which may raise a priority.
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except PermissionError:
        pass
    run(args.a, args.b, args.delay, args.jitter, args.loss)


if __name__ == "__main__":
    main()
