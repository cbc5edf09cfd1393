"""Off loopback: a seed and a trainer on public addresses, volunteers behind home routers (tests/netlab.py).

One lab per module (building it takes a second; the seed ~10 s): the seed and the trainer each on a
public host, a home router with no port forward and one with a forward the test adds. Each test starts
its own volunteer (and trainer run) and stops them. Root and ``ip netns`` are needed: elsewhere the
module skips, saying why.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import Processes, cli, wait_for
from tests.netlab import Host, Link, NetLab, leftover_namespaces
from volunteer.core.harness import ChildProcess

pytestmark = pytest.mark.integration

why_not = NetLab.available()
if why_not:
    pytest.skip(f"no network lab here: {why_not}", allow_module_level=True)

# One layer of 4 experts, all on one volunteer: a trainer step sends each expert 16*64*2/4 = 512 rows
# of 256 floats, 512 KiB a call each way, four times what a circuit relay lets through (128 KiB).
LAB_MANIFEST = textwrap.dedent(
    """
    schema_version = 1
    name = "lab-lm"
    dht_prefix = "lablm"
    d_model = 256
    max_batch_size = 4096
    wire_dtype = "float16"

    [optimizer]
    name = "adam"
    lr = 0.001

    [[expert_types]]
    name = "small"
    block = "residual_ffn"
    d_hidden = 256

    [[layers]]
    uid_prefix = "lablm_ffn0"
    grid = [1, 4]
    expert_type = "small"

    [trainer]
    seq_len = 64
    batch_size = 16
    k_best = 2
    lr = 0.003
    """
)
CALL_BYTES = 16 * 64 * 2 // 4 * (256 * 2 + 8)  # a call's rows (batch x seq x k / 4 experts) in float16 on the wire
SEED_HTTP, SEED_DHT = 8470, 31337
SERVED_BOUND = 60.0  # seconds from "serving" to backward samples counted, behind a NAT (the goal)


class Lab:
    """A seed host, a trainer host and ``homes`` home routers with one machine each, every internet link
    through ``link``; ``cloud`` adds a public host for a volunteer."""

    def __init__(self, root: Path, manifest: str = LAB_MANIFEST, link: Link = Link(), homes: int = 1,
                 cloud: bool = False):
        self.root = root
        self.net = NetLab()
        self.procs = Processes()
        try:
            self.seed_host = self.net.public_host("seed", link)
            self.trainer_host = self.net.public_host("train", link)
            self.cloud = self.net.public_host("cloud", link) if cloud else None
            self.routers = [self.net.home(f"r{i + 1}", link) for i in range(homes)]
            self.pcs = [self.net.lan_host(router, f"pc{i + 1}") for i, router in enumerate(self.routers)]
            self.home, self.pc = self.routers[0], self.pcs[0]
            self.manifest = root / "lab-lm.toml"
            self.manifest.write_text(manifest)
            self.url = f"http://{self.seed_host.ip}:{SEED_HTTP}"
            self.seed = self.start_seed()
        except BaseException:
            self.close()
            raise

    def start_seed(self) -> ChildProcess:
        """The seed, on its fixed ports with its identity in ``root/seed``: a restart is the same peer."""
        seed = self.procs.add(ChildProcess("seed", self.seed_host.argv(
            sys.executable, "-m", "coordinator_seeds.cli", "run", "--host", self.seed_host.ip,
            "--http-port", str(SEED_HTTP), "--dht-port", str(SEED_DHT), "--experiment", str(self.manifest),
            "--data-dir", str(self.root / "seed"))))
        seed.wait_for_line(r"seed HTTP on", timeout=90)
        return seed

    def close(self) -> None:
        try:
            # every child told at once, the trainer first: each volunteer drains for seconds, one after the
            # other they made the WAN module's teardown last half a minute
            for child in reversed(self.procs.children):
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            self.procs.stop_all()
        finally:
            self.net.close()

    def volunteer(self, home: Path, *extra: str, name: str = "volunteer", on: Host | None = None,
                  experts: int = 4) -> ChildProcess:
        return self.procs.add(ChildProcess(name, (on or self.pc).argv(
            sys.executable, "-m", "volunteer.cli", "start", "--coordinator", self.url, "--max-experts",
            str(experts), "--announce-interval", "5", *extra), env={"VOLUNTEER_HOME": str(home)}))

    def trainer(self, home: Path, steps: int = 100000, log_every: int = 5, *extra: str) -> ChildProcess:
        return self.procs.add(ChildProcess("trainer", self.trainer_host.argv(
            sys.executable, "-m", "coordinator_seeds.cli", "train", "--coordinator", self.url,
            "--key", str(self.root / "seed" / "trainer-key.der"), "--steps", str(steps), "--log-every",
            str(log_every), "--host", self.trainer_host.ip, *extra), env={"VOLUNTEER_HOME": str(home)}))


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("lab"))
    try:
        yield lab
    finally:
        prefix = lab.net.prefix
        lab.close()
        assert not leftover_namespaces(prefix), "the lab left namespaces behind"


@pytest.fixture
def homes() -> Iterator[tuple[Path, Path]]:
    """A volunteer home and a trainer home, short paths (Unix sockets live there)."""
    made = [Path(tempfile.mkdtemp(prefix="lab-")) for _ in range(2)]
    yield made[0], made[1]
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def _status(home: Path) -> dict:
    result = cli(home, "status", "--json")
    return json.loads(result.stdout) if result.returncode == 0 else {}


def _backward_samples(home: Path) -> int:
    return _status(home).get("session", {}).get("backward_samples", 0)


def _events(child: ChildProcess, name: str) -> list[dict]:
    return [e for e in (json.loads(line) for line in child.output if line.startswith("{")) if e.get("event") == name]


# Reads, as a trainer does (a client DHT on host ``argv[2]``), the ``reachable`` flags that the volunteer
# ``argv[3]`` signs in its server records, until they are ``[argv[4]]`` or ``argv[5]`` seconds have passed;
# prints the flags last seen. One process polls: starting a DHT costs seconds.
READ_SIGNED_FLAG = textwrap.dedent(
    """
    import sys, tempfile, time
    from pathlib import Path
    from volunteer.core.expert_records import read_servers
    from volunteer.core.records import join_dht
    from volunteer.core.seed_client import fetch_experiment
    url, host, peer_id, want = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "True"
    deadline = time.monotonic() + float(sys.argv[5])
    experiment = fetch_experiment(url, Path(tempfile.mkdtemp()))
    dht = join_dht(experiment.manifest.dht_prefix, experiment.initial_peers, host=host, client_mode=True)
    while True:
        found = read_servers(dht, experiment.manifest.dht_prefix, experiment.manifest.all_uids())
        flags = sorted({r.reachable for rs in found.values() for r in rs if r.peer_id == peer_id})
        if flags == [want] or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    print(flags)
    dht.shutdown()
    """
)


def _signed_reachable(lab: Lab, home: Path, want: bool, within: float = 20.0) -> list[bool]:
    """The volunteer's signed ``reachable`` flags, read from the trainer's host once they are ``[want]``
    (the volunteer announces every 5 s) or ``within`` seconds have passed."""
    peer_id = _status(home)["peer_id"]
    result = lab.trainer_host.run(sys.executable, "-c", READ_SIGNED_FLAG, lab.url, lab.trainer_host.ip, peer_id,
                                  str(want), str(within), timeout=within + 60)
    return json.loads(result.stdout.strip().splitlines()[-1].lower())


def test_the_router_drops_inbound_until_a_port_is_forwarded(lab):
    listener = lab.procs.add(ChildProcess("listener", lab.pc.argv(
        sys.executable, "-c", "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 5555)); s.listen();"
        "print('listening', flush=True); c, a = s.accept(); print('accepted', a[0], flush=True); time.sleep(5)")))
    listener.wait_for_line("listening", 10)
    dial = [sys.executable, "-c", f"import socket; socket.create_connection(('{lab.home.ip}', 5555), timeout=2)"]
    assert lab.seed_host.run(*dial, check=False).returncode != 0, "the router let an unsolicited connection in"
    outbound = lab.pc.run(sys.executable, "-c", f"import socket; socket.create_connection(('{lab.seed_host.ip}', "
                                                f"{SEED_HTTP}), timeout=2)", check=False)
    assert outbound.returncode == 0, f"the home cannot reach the seed: {outbound.stderr}"
    lab.home.forward_port(5555, lab.pc)
    assert lab.seed_host.run(*dial, check=False).returncode == 0
    # masqueraded: the pc sees the seed's own address; the seed would see the router's
    assert listener.wait_for_line(r"accepted (\S+)", 10).group(1) == lab.seed_host.ip


def test_baseline_a_natted_volunteer_that_does_not_dial_out_serves_nothing(lab, homes):
    """What the issue measured: serving, announced, and never called (``routing: not found``)."""
    home, trainer_home = homes
    volunteer = lab.volunteer(home, "--no-dial-trainers")
    volunteer.wait_for_line(r'"event": "serving"', timeout=150)
    trainer = lab.trainer(trainer_home, 15, 5, "--idle-wait", "0")  # it finds no expert: no need to wait for one
    trainer.wait_for_line(r"step 15 ", timeout=240)
    assert trainer.proc.wait(60) == 0, trainer.tail()
    assert _backward_samples(home) == 0
    reach = wait_for(lambda: _status(home).get("reach"), 30, "a reachability value in status")
    assert reach["reach"] in ("unreachable", "outbound", "checking")
    assert reach["reach"] != "direct"
    volunteer.stop()


def test_a_natted_volunteer_dials_the_trainer_and_is_called_back(lab, homes):
    home, trainer_home = homes
    trainer = lab.trainer(trainer_home)
    volunteer = lab.volunteer(home)
    volunteer.wait_for_line(r'"event": "serving"', timeout=150)
    serving_at = time.monotonic()
    wait_for(lambda: _backward_samples(home) > 0, SERVED_BOUND, f"backward samples within {SERVED_BOUND:.0f} s")
    took = time.monotonic() - serving_at
    reach = _status(home)["reach"]
    assert reach["reach"] == "outbound", reach
    assert reach["connected"] >= 1 and reach["observed_host"] == lab.home.ip
    assert f"--port {reach['port']}" in reach["advice"]
    forward = _status(home)["session"]["forward_samples"]
    assert forward > 0
    print(f"behind NAT, no forward: backward samples {took:.1f} s after serving; {CALL_BYTES // 1024} KiB calls")
    started = time.monotonic()
    assert _signed_reachable(lab, home, False) == [False]  # trainers prefer direct servers over it
    print(f"its signed server records say reachable=False (read in {time.monotonic() - started:.1f} s)")
    trainer.stop()
    volunteer.stop()
    assert any(e["reach"] == "outbound" for e in _events(volunteer, "reachability"))


def test_with_a_port_forward_and_announce_host_it_is_direct(lab, homes):
    home, trainer_home = homes
    port = 40123
    lab.home.forward_port(port, lab.pc)
    volunteer = lab.volunteer(home, "--port", str(port), "--announce-host", lab.home.ip, "--no-dial-trainers")
    volunteer.wait_for_line(r'"event": "serving"', timeout=150)
    reach = wait_for(lambda: (_status(home).get("reach") or {}).get("reach") == "direct" and _status(home)["reach"],
                     30, "reach: direct")
    assert reach["observed_host"] == lab.home.ip and reach["port"] == port
    started = time.monotonic()
    assert _signed_reachable(lab, home, True) == [True]  # announced after the reading: direct servers are preferred
    print(f"its signed server records say reachable=True (read in {time.monotonic() - started:.1f} s)")
    trainer = lab.trainer(trainer_home)
    wait_for(lambda: _backward_samples(home) > 0, SERVED_BOUND, "backward samples with a port forward")
    trainer.stop()
    volunteer.stop()


def test_calls_are_bigger_than_what_a_relay_carries():
    assert CALL_BYTES > 128 * 1024
    assert re.search(r"d_model = 256", LAB_MANIFEST) and re.search(r'wire_dtype = "float16"', LAB_MANIFEST)
