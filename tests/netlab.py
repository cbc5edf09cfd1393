"""A small internet in network namespaces, for tests that must not run on loopback.

One namespace plays the internet: a bridge that every "public" host and every home router plugs
into with a veth pair. Public hosts take addresses in 192.0.0.128/25, a reserved block that libp2p
counts as public (the documentation ranges 192.0.2/24, 198.51.100/24, 203.0.113/24 it counts as
unroutable, so AutoNAT and relays would ignore peers there). A home is a router namespace with a WAN
leg on the bridge and a LAN (10.<n>.0.0/24) behind it; the router masquerades what goes out
(nftables) and forwards nothing inbound unless a test adds a port forward. Interfaces are made
inside the lab's namespaces (``ip link add ... netns``), so nothing appears in the machine's own
namespace and no route leads out of the lab.

Links can be capped in bandwidth with tc ``tbf``. These kernels have no ``netem``, so there is no
kernel delay or loss here; ``Link.delay`` is a TCP-level forwarder (lab equipment, not product code),
see ``DelayedPort``.

Every command runs as root; ``NetLab.available()`` says why not where namespaces cannot be made.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Sequence

PUBLIC_NET = "192.0.0.128/25"
PUBLIC_PREFIX = 25


def _run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@dataclass
class Host:
    """A namespace with one address on a network; ``argv`` runs a command inside it."""

    lab: NetLab
    ns: str
    ip: str

    def argv(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *command]

    def run(self, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        result = subprocess.run(self.argv(*command), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{command} in {self.ns} failed ({result.returncode}): {result.stderr.strip()}")
        return result


@dataclass
class Router(Host):
    """A home router: WAN address ``ip`` on the internet, LAN ``10.<n>.0.0/24`` behind it."""

    lan_prefix: str = ""
    hosts: list[Host] = field(default_factory=list)
    forwards: list[tuple[int, str, int]] = field(default_factory=list)

    def forward_port(self, port: int, to: Host, to_port: int | None = None) -> None:
        """Forward TCP ``port`` of the WAN address to ``to`` (what a user sets up on a home router)."""
        to_port = to_port or port
        self.lab._nft(self.ns, f"add rule ip home prerouting iifname wan tcp dport {port} dnat to {to.ip}:{to_port}")
        self.forwards.append((port, to.ip, to_port))

    def uplink(self, up: bool) -> None:
        """Unplug (or plug back) the router's WAN cable: its veth goes down on both ends."""
        state = "up" if up else "down"
        _run("ip", "-n", self.ns, "link", "set", "wan", state)


class NetLab:
    """Namespaces named ``<prefix>-...``; ``close`` deletes them all (and kills what runs in them)."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"nl{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.namespaces: list[str] = []
        self.internet = self._namespace("inet")
        _run("ip", "-n", self.internet, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.internet, "link", "set", "br0", "up")
        self._next_public = 130  # .129 is left free: a gateway nobody has
        self._next_port = 0
        self._homes = 0

    @staticmethod
    def available() -> str | None:
        """None if this machine can build the lab, else why not (a reason to skip with)."""
        for tool in ("ip", "nft", "tc"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (apt-get install iproute2 nftables)"
        if os.geteuid() != 0:
            return "network namespaces need root"
        probe = f"nlprobe{os.getpid()}"
        made = _run("ip", "netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        _run("ip", "netns", "del", probe, check=False)
        return None

    # --- building ----------------------------------------------------------------------------------

    def _namespace(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def _plug(self, ns: str, ifname: str) -> str:
        """A veth from ``ns`` (named ``ifname``) to the internet's bridge; returns the bridge-side name."""
        self._next_port += 1
        port = f"p{self._next_port}"
        _run("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.internet)
        _run("ip", "-n", self.internet, "link", "set", port, "master", "br0")
        _run("ip", "-n", self.internet, "link", "set", port, "up")
        _run("ip", "-n", ns, "link", "set", ifname, "up")
        return port

    def _public_ip(self) -> str:
        if self._next_public > 254:
            raise RuntimeError("the lab's public block is full")
        ip = f"192.0.0.{self._next_public}"
        self._next_public += 1
        return ip

    def public_host(self, name: str) -> Host:
        """A machine with a public address (a cloud box, the seed)."""
        ns = self._namespace(name)
        ip = self._public_ip()
        self._plug(ns, "eth0")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/{PUBLIC_PREFIX}", "dev", "eth0")
        return Host(self, ns, ip)

    def home(self, name: str) -> Router:
        """A home router that masquerades its LAN and forwards nothing inbound."""
        self._homes += 1
        lan = f"10.{self._homes}.0"
        ns = self._namespace(name)
        wan_ip = self._public_ip()
        self._plug(ns, "wan")
        _run("ip", "-n", ns, "addr", "add", f"{wan_ip}/{PUBLIC_PREFIX}", "dev", "wan")
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._nft(ns, router_rules(lan))
        return Router(self, ns, wan_ip, lan_prefix=lan)

    def lan_host(self, router: Router, name: str) -> Host:
        """A machine on ``router``'s LAN, its default route through the router."""
        ns = self._namespace(name)
        index = len(router.hosts) + 2
        ip, gateway = f"{router.lan_prefix}.{index}", f"{router.lan_prefix}.1"
        lan_if = f"lan{index}"
        _run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", lan_if, "netns", router.ns)
        if index == 2:
            _run("ip", "-n", router.ns, "addr", "add", f"{gateway}/24", "dev", lan_if)
        else:  # one /24 on several legs: a host route for each further machine
            _run("ip", "-n", router.ns, "route", "add", f"{ip}/32", "dev", lan_if)
        _run("ip", "-n", router.ns, "link", "set", lan_if, "up")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _run("ip", "-n", ns, "route", "add", "default", "via", gateway)
        host = Host(self, ns, ip)
        router.hosts.append(host)
        return host

    def _nft(self, ns: str, rules: str) -> None:
        if "\n" in rules:
            _run("ip", "netns", "exec", ns, "nft", "-f", "-", input=rules)
        else:
            _run("ip", "netns", "exec", ns, "nft", *rules.split())

    # --- links -------------------------------------------------------------------------------------

    def limit_rate(self, host: Host, mbit: float, ifname: str | None = None) -> None:
        """Cap what ``host`` sends on its internet leg (tc tbf; both directions: cap each end)."""
        ifname = ifname or ("wan" if isinstance(host, Router) else "eth0")
        _run("ip", "netns", "exec", host.ns, "tc", "qdisc", "replace", "dev", ifname, "root", "tbf",
             "rate", f"{mbit}mbit", "burst", "32kbit", "latency", "400ms")

    # --- teardown ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill whatever still runs in the lab's namespaces, then delete them (the veths go with them)."""
        for ns in reversed(self.namespaces):
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            _run("ip", "netns", "pids", ns, check=False).stdout.strip() for ns in self.namespaces
        ):
            time.sleep(0.1)
        for ns in reversed(self.namespaces):
            _run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def router_rules(lan: str) -> str:
    """The router's nftables: masquerade the LAN out of ``wan``, drop new inbound connections; the
    empty ``prerouting`` chain is where ``forward_port`` adds its DNAT rules."""
    return f"""
table ip home {{
    chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {lan}.0/24 oifname "wan" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname != "wan" accept
        ct status dnat accept
    }}
}}
"""


def leftover_namespaces(prefix: str) -> Sequence[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines()
            if line.startswith(prefix)]
