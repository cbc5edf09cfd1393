"""A small internet in network namespaces, for tests that must not run on loopback.

One namespace plays the internet: a bridge that every "public" host and every home router plugs
into with a veth pair. Public hosts take addresses in 192.0.0.128/25, a reserved block that libp2p
counts as public (the documentation ranges 192.0.2/24, 198.51.100/24, 203.0.113/24 it counts as
unroutable, so AutoNAT and relays would ignore peers there). A home is a router namespace with a WAN
leg on the bridge and a LAN (10.<n>.0.0/24) behind it; the router masquerades what goes out
(nftables) and forwards nothing inbound unless a test adds a port forward. Interfaces are made
inside the lab's namespaces (``ip link add ... netns``), so nothing appears in the machine's own
namespace and no route leads out of the lab.

A host's or router's internet link can have delay, jitter and loss (``Link``). These kernels have no
``netem``: such a link runs through a "cable" namespace where ``tests/linkemu.py`` moves the Ethernet
frames between two veths through a delay queue (lab equipment, not product code). Bandwidth caps use
tc ``tbf`` on the host's end. Every interface has ``gso_max_segs 1``: no 64 KiB TCP super-frames, so
what crosses a cable fits its MTU.

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


@dataclass(frozen=True)
class Link:
    """What a host's cable to the internet does to frames, each direction: one-way ``delay`` and
    ``jitter`` (seconds), ``loss`` (fraction), ``rate_mbit`` (tc tbf on the host's end; 0 = none)."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    rate_mbit: float = 0.0

    @property
    def emulated(self) -> bool:
        return bool(self.delay or self.jitter or self.loss)


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
        self.cables: list[subprocess.Popen] = []
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

    def _plug(self, ns: str, ifname: str, link: Link = Link()) -> str:
        """A veth from ``ns`` (named ``ifname``) to the internet's bridge, through a cable namespace
        running linkemu if ``link`` has delay, jitter or loss; returns the bridge-side name."""
        self._next_port += 1
        port = f"p{self._next_port}"
        if not link.emulated:
            _veth(ns, ifname, self.internet, port)
        else:
            cable = self._namespace(f"{ns.removeprefix(self.prefix + '-')}-c")
            _veth(ns, ifname, cable, "ca")
            _veth(cable, "cb", self.internet, port)
            for end in ("ca", "cb"):
                _run("ip", "-n", cable, "link", "set", "dev", end, "promisc", "on")
            self._start_cable(cable, link)
        _run("ip", "-n", self.internet, "link", "set", port, "master", "br0")
        _run("ip", "-n", self.internet, "link", "set", port, "up")
        if link.rate_mbit:
            self._tbf(ns, ifname, link.rate_mbit)
        return port

    def _start_cable(self, cable: str, link: Link) -> None:
        import sys
        from pathlib import Path

        script = str(Path(__file__).with_name("linkemu.py"))
        proc = subprocess.Popen(["ip", "netns", "exec", cable, sys.executable, script, "ca", "cb", "--delay",
                                 str(link.delay), "--jitter", str(link.jitter), "--loss", str(link.loss)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.cables.append(proc)
        if proc.stdout.readline().strip() != "linkemu ready":
            raise RuntimeError(f"the link emulator in {cable} did not start")

    def _public_ip(self) -> str:
        if self._next_public > 254:
            raise RuntimeError("the lab's public block is full")
        ip = f"192.0.0.{self._next_public}"
        self._next_public += 1
        return ip

    def public_host(self, name: str, link: Link = Link()) -> Host:
        """A machine with a public address (a cloud box, the seed)."""
        ns = self._namespace(name)
        ip = self._public_ip()
        self._plug(ns, "eth0", link)
        _run("ip", "-n", ns, "addr", "add", f"{ip}/{PUBLIC_PREFIX}", "dev", "eth0")
        return Host(self, ns, ip)

    def home(self, name: str, link: Link = Link()) -> Router:
        """A home router that masquerades its LAN and forwards nothing inbound."""
        self._homes += 1
        lan = f"10.{self._homes}.0"
        ns = self._namespace(name)
        wan_ip = self._public_ip()
        self._plug(ns, "wan", link)
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
        _veth(ns, "eth0", router.ns, lan_if)
        if index == 2:
            _run("ip", "-n", router.ns, "addr", "add", f"{gateway}/24", "dev", lan_if)
        else:  # one /24 on several legs: a host route for each further machine
            _run("ip", "-n", router.ns, "route", "add", f"{ip}/32", "dev", lan_if)
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

    @staticmethod
    def _tbf(ns: str, ifname: str, mbit: float) -> None:
        """Cap what leaves ``ifname`` (tc tbf): a home uplink."""
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", ifname, "root", "tbf",
             "rate", f"{mbit}mbit", "burst", "32kbit", "latency", "400ms")

    # --- teardown ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill whatever still runs in the lab's namespaces, then delete them (the veths go with them)."""
        for proc in self.cables:
            proc.kill()
            proc.wait(10)
        self.cables.clear()
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


def _veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair made straight inside two lab namespaces (never in the machine's own), both ends up."""
    _run("ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    for ns, ifname in ((ns_a, if_a), (ns_b, if_b)):
        # one TCP segment per frame: a cable (linkemu) cannot write out a 64 KiB GSO super-frame
        _run("ip", "-n", ns, "link", "set", "dev", ifname, "gso_max_segs", "1", "up")


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
