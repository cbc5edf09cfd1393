"""The coordinator seed (real hivemind DHT + hypercorn, in a child process) and the client that reads it.

Real-peer tests run the seed exactly as production would: its own process, a persistent identity,
HTTP on 127.0.0.1 port 0, stopped by closing its stdin. The client's odd-answer cases (500s, HTML,
huge bodies, slow servers) use ``httpx.MockTransport``; unreachable means a real closed loopback port.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import trio

with warnings.catch_warnings():
    # torch 2.13 warns (attributed to torch.jit, so pyproject's hivemind.* filter misses it) when
    # hivemind's import applies @torch.jit.script; nothing we call, so silence it for the import only.
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    import hivemind  # noqa: F401

from coordinator_seeds.seed import Seed, SeedError, SeedSettings, run_seed
from volunteer.core.manifest import default_manifest
from volunteer.core.paths import Paths, default_paths
from volunteer.core.records import join_dht
from volunteer.core.seed_client import (
    MAX_BODY_BYTES,
    CoordinatorError,
    Experiment,
    cache_path,
    experiment_from_file,
    fetch_experiment,
)

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0  # importing torch + hivemind and starting a DHT: ~3 s here, generous for slow CI
STOP_TIMEOUT = 30.0

SEED_SCRIPT = """
import json, sys, trio
from pathlib import Path
from coordinator_seeds.seed import SeedSettings, run_seed
from volunteer.core.manifest import default_manifest

async def main():
    settings = SeedSettings(default_manifest(), http_port=0, identity_path=Path(sys.argv[1]))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(run_seed, settings)
        print(json.dumps({"port": port}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # the test closes our stdin to stop us
        nursery.cancel_scope.cancel()

trio.run(main)
"""


@pytest.fixture(autouse=True)
def volunteer_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("VOLUNTEER_HOME", str(home))
    return home


# --- a seed in a child process -------------------------------------------------------------------


class SeedProcess:
    def __init__(self, workdir: Path, identity: Path):
        self.stderr_path = workdir / f"seed-{time.monotonic_ns()}.log"
        env = dict(os.environ, VOLUNTEER_HOME=str(workdir / "seed-home"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        with open(self.stderr_path, "wb") as stderr:
            # Own session: if the clean stop fails, the whole group (DHT process, p2pd) can be killed.
            self.proc = subprocess.Popen([sys.executable, "-c", SEED_SCRIPT, str(identity)], cwd=REPO, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                         start_new_session=True)
        try:
            self.port = int(self._read_json_line(START_TIMEOUT)["port"])
        except BaseException:
            self.kill()
            raise
        self.url = f"http://127.0.0.1:{self.port}"

    def _read_json_line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline, buffer = time.monotonic() + timeout, b""
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"seed did not start in {timeout} s; stderr:\n{self.stderr()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    pytest.fail(f"seed exited with {self.proc.wait(5)}; stderr:\n{self.stderr()}")
                buffer += chunk
        return json.loads(buffer.split(b"\n", 1)[0])

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        """Clean stop (the DHT must release its identity), bounded; killed if it hangs."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"seed did not stop in {STOP_TIMEOUT} s; stderr:\n{self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(STOP_TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeedProcess]:
    workdir = tmp_path_factory.mktemp("seed")
    process = SeedProcess(workdir, workdir / "identity.key")
    try:
        yield process
        assert process.stop() == 0, process.stderr()
    finally:
        process.kill()


def healthz(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/healthz", timeout=5.0)
    response.raise_for_status()
    return response.json()


async def _routing_table_peers(dht: Any, node: Any) -> list[str]:
    return [peer.to_base58() for peer in node.protocol.routing_table.peer_id_to_uid]


@pytest.mark.integration
def test_seed_serves_experiment_and_bootstraps_a_dht(seed: SeedProcess, tmp_path: Path) -> None:
    experiment = fetch_experiment(seed.url, tmp_path / "cache")
    assert experiment.source == "coordinator"
    assert experiment.manifest == default_manifest()
    assert experiment.initial_peers and all(p.startswith("/ip4/127.0.0.1/") for p in experiment.initial_peers)

    health = healthz(seed.url)
    assert health["ok"] is True and health["uptime_s"] >= 0
    assert all(p.endswith(f"/p2p/{health['peer_id']}") for p in experiment.initial_peers)

    # join_dht raises if no initial peer answers; the routing table shows it really met the seed.
    dht = join_dht(experiment.manifest.dht_prefix, experiment.initial_peers)
    try:
        assert health["peer_id"] in dht.run_coroutine(_routing_table_peers)
    finally:
        dht.shutdown()
        dht.join(STOP_TIMEOUT)


@pytest.mark.integration
def test_seed_unknown_path_is_404(seed: SeedProcess) -> None:
    assert httpx.get(f"{seed.url}/v1/nope", timeout=5.0).status_code == 404


@pytest.mark.integration
def test_seed_identity_survives_restart(tmp_path: Path) -> None:
    identity = tmp_path / "keys" / "seed.key"
    peer_ids = []
    for _ in range(2):
        process = SeedProcess(tmp_path, identity)
        try:
            peer_ids.append(healthz(process.url)["peer_id"])
            assert process.stop() == 0, process.stderr()
        finally:
            process.kill()
    assert identity.exists()
    assert peer_ids[0] and peer_ids[0] == peer_ids[1]


# --- seed failures, in process (they happen before any DHT starts) --------------------------------


def test_http_port_in_use_is_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        settings = SeedSettings(default_manifest(), http_port=port, identity_path=tmp_path / "id.key")
        with pytest.raises(SeedError, match="in use") as info:
            trio.run(run_seed, settings)
    assert "\n" not in str(info.value) and str(port) in str(info.value)
    assert not (tmp_path / "id.key").exists()  # failed before starting a DHT


def test_dht_port_in_use_is_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        settings = SeedSettings(default_manifest(), dht_port=held.getsockname()[1], identity_path=tmp_path / "k")
        with pytest.raises(SeedError, match="DHT port .* in use"):
            Seed(settings).start_dht()


def test_announce_host_needs_fixed_dht_port() -> None:
    with pytest.raises(SeedError, match="fixed dht_port"):
        Seed(SeedSettings(default_manifest(), announce_host="203.0.113.7"))


def test_default_identity_lives_under_volunteer_home(volunteer_home: Path) -> None:
    path = SeedSettings(default_manifest()).resolved_identity_path()
    assert path == volunteer_home / "data" / "seed_identity.key"


# --- client against odd answers (MockTransport) ---------------------------------------------------

URL = "http://127.0.0.1:9"
PEERS = {"peer_id": "QmXrPbzKT1gnMfAVgLY6ANgk2xKHzHBCMXjVEC5oUJsvSh", "maddrs": ["/ip4/127.0.0.1/tcp/4001/p2p/QmXrPbzKT1gnMfAVgLY6ANgk2xKHzHBCMXjVEC5oUJsvSh"]}


def closed_port() -> int:
    """A loopback port nobody listens on: bound (so nothing else takes it during the test), never listened."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def mock(experiment: Callable[[int], httpx.Response], peers: Callable[[int], httpx.Response] | None = None,
         ) -> tuple[httpx.MockTransport, dict[str, int]]:
    calls = {"experiment": 0, "peers": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "127.0.0.1"
        if request.url.path == "/v1/experiment":
            calls["experiment"] += 1
            return experiment(calls["experiment"])
        assert request.url.path == "/v1/peers"
        calls["peers"] += 1
        return peers(calls["peers"]) if peers else httpx.Response(200, json=PEERS)

    return httpx.MockTransport(handler), calls


def good(_: int) -> httpx.Response:
    return httpx.Response(200, json=default_manifest().to_dict())


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fetch(transport: httpx.BaseTransport, cache: Path, sleeps: Sleeps | None = None, **kw: Any) -> Experiment:
    return fetch_experiment(URL, cache, transport=transport, sleep=sleeps if sleeps is not None else Sleeps(), **kw)


def test_retries_500s_then_succeeds_and_caches(tmp_path: Path) -> None:
    transport, calls = mock(lambda n: httpx.Response(500) if n <= 3 else good(n))
    sleeps = Sleeps()
    experiment = fetch(transport, tmp_path, sleeps, backoff=0.5)
    assert experiment == Experiment(default_manifest(), tuple(PEERS["maddrs"]), "coordinator")
    assert calls["experiment"] == 4
    assert len(sleeps) == 3
    for i, delay in enumerate(sleeps):  # exponential, with jitter in [half, full]
        assert 0.5 * 2**i * 0.5 <= delay <= 0.5 * 2**i

    record = json.loads(cache_path(tmp_path, URL).read_text())
    assert record["manifest"] == default_manifest().to_dict()
    assert record["initial_peers"] == PEERS["maddrs"]
    assert [p.name for p in tmp_path.iterdir()] == [cache_path(tmp_path, URL).name]  # no temp file left


def test_gives_up_after_attempts_of_503(tmp_path: Path) -> None:
    transport, calls = mock(lambda n: httpx.Response(503))
    sleeps = Sleeps()
    with pytest.raises(CoordinatorError, match=r"unreachable after 3 attempts \(HTTP 503 .*no cached experiment"):
        fetch(transport, tmp_path, sleeps, attempts=3)
    assert calls["experiment"] == 3 and len(sleeps) == 2


@pytest.mark.parametrize(
    "response, message",
    [
        (httpx.Response(200, html="<html><body>Welcome to nginx</body></html>"), "HTML from /v1/experiment"),
        (httpx.Response(200, text='{"name": "x",'), "invalid JSON from /v1/experiment"),
        (httpx.Response(200, json={"name": "x"}), "invalid experiment: manifest: missing field"),
        (httpx.Response(200, json=[1, 2]), "invalid experiment: manifest: top level must be a table"),
        (httpx.Response(404, text="not found"), "HTTP 404 from /v1/experiment"),
        (httpx.Response(200, content=b"\xff\xfe\x00garbage"), "invalid JSON"),
    ],
)
def test_wrong_answers_are_not_retried(tmp_path: Path, response: httpx.Response, message: str) -> None:
    transport, calls = mock(lambda n: response)
    sleeps = Sleeps()
    with pytest.raises(CoordinatorError, match=message) as info:
        fetch(transport, tmp_path, sleeps)
    assert "\n" not in str(info.value) and str(info.value).endswith("and no cached experiment")
    assert calls["experiment"] == 1 and sleeps == []


@pytest.mark.parametrize(
    "peers, message",
    [
        ({"maddrs": []}, "non-empty list"),
        ({"maddrs": "/ip4/1.2.3.4/tcp/1"}, "non-empty list"),
        ({"maddrs": ["http://evil.example/"]}, "is not a multiaddr"),
        ({"maddrs": ["/ip4/1.2.3.4/tcp/1 /x"]}, "is not a multiaddr"),
        ({"maddrs": [7]}, "is not a multiaddr"),
        # shaped like multiaddrs, but only the daemon's parser (and now ours) says no: issue 12.5
        ({"maddrs": ["/ip4/999.1.1.1/tcp/4001"]}, "is not a valid multiaddr"),
        ({"maddrs": ["/ip4/1.2.3.4/tcp/4001/p2p/QmSeed"]}, "is not a valid multiaddr"),
        ({"maddrs": ["/ip4/1.2.3.4/udp/notaport"]}, "is not a valid multiaddr"),
        ({"maddrs": [f"/ip4/10.0.0.1/tcp/{i}" for i in range(65)]}, "65 peers, at most 64"),
        (["/ip4/1.2.3.4/tcp/1"], "not a JSON object"),
    ],
)
def test_invalid_peer_lists_are_refused(tmp_path: Path, peers: Any, message: str) -> None:
    transport, calls = mock(good, lambda n: httpx.Response(200, json=peers))
    with pytest.raises(CoordinatorError, match=message):
        fetch(transport, tmp_path)
    assert calls["peers"] == 1


def test_accepts_ip6_and_dns_peers(tmp_path: Path) -> None:
    maddrs = ["/ip6/::1/tcp/4001/p2p/QmXrPbzKT1gnMfAVgLY6ANgk2xKHzHBCMXjVEC5oUJsvSh", "/dns4/seed.example.org/tcp/4001/p2p/QmVmmZyPfVHXCcpkF1oQYUNw8S9onQjqX4quYDiEpmyCX7", "/dnsaddr/example.org"]
    transport, _ = mock(good, lambda n: httpx.Response(200, json={"maddrs": maddrs}))
    assert fetch(transport, tmp_path).initial_peers == tuple(maddrs)


def test_body_over_one_mib_is_refused(tmp_path: Path) -> None:
    transport, calls = mock(lambda n: httpx.Response(200, content=b" " * (MAX_BODY_BYTES + 1)))
    with pytest.raises(CoordinatorError, match="body .* more than|larger than"):
        fetch(transport, tmp_path)
    assert calls["experiment"] == 1


def test_streamed_body_without_length_is_cut_off(tmp_path: Path) -> None:
    produced = []

    def endless() -> Iterator[bytes]:
        for _ in range(64):  # 4 MiB if read to the end
            produced.append(1)
            yield b"x" * 65536

    transport, _ = mock(lambda n: httpx.Response(200, content=endless()))
    with pytest.raises(CoordinatorError, match="larger than 1048576 bytes"):
        fetch(transport, tmp_path)
    assert len(produced) <= 17  # stopped right after the first chunk over the cap


def test_timeouts_are_retried(tmp_path: Path) -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    sleeps = Sleeps()
    with pytest.raises(CoordinatorError, match=r"unreachable after 4 attempts \(timed out\)"):
        fetch(httpx.MockTransport(timeout), tmp_path, sleeps)
    assert len(sleeps) == 3


def test_slow_drip_body_hits_overall_deadline(tmp_path: Path) -> None:
    def drip() -> Iterator[bytes]:
        for _ in range(100):  # 10 s if not cut off
            time.sleep(0.1)  # the slowness is the point: a body that trickles in must hit the overall deadline
            yield b" "

    transport, _ = mock(lambda n: httpx.Response(200, content=drip()))
    started = time.monotonic()
    with pytest.raises(CoordinatorError, match="timed out"):
        fetch(transport, tmp_path, attempts=2, timeout=0.3)
    assert time.monotonic() - started < 3.0


# --- unreachable coordinator and the cache --------------------------------------------------------


def test_unreachable_without_cache(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/"
    sleeps = Sleeps()
    with pytest.raises(CoordinatorError) as info:
        fetch_experiment(url, tmp_path / "cache", sleep=sleeps, timeout=2.0)
    assert str(info.value) == f"coordinator {url} unreachable after 4 attempts (connection refused) and no cached experiment"
    assert len(sleeps) == 3


def test_unreachable_falls_back_to_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    transport, _ = mock(good)
    first = fetch_experiment(url, tmp_path, transport=transport, sleep=Sleeps())
    assert first.source == "coordinator"

    with caplog.at_level(logging.WARNING, logger="volunteer.core.seed_client"):
        cached = fetch_experiment(url, tmp_path, sleep=Sleeps(), timeout=2.0)
    assert cached == Experiment(first.manifest, first.initial_peers, "cache")
    assert any("connection refused" in r.getMessage() and "cached" in r.getMessage() for r in caplog.records)

    # The cache is per URL: another coordinator does not inherit it.
    with pytest.raises(CoordinatorError, match="no cached experiment"):
        fetch_experiment(url + "/other", tmp_path, sleep=Sleeps(), timeout=2.0, attempts=1)


def test_wrong_answer_also_falls_back_to_cache(tmp_path: Path) -> None:
    fetch(mock(good)[0], tmp_path)
    html, _ = mock(lambda n: httpx.Response(200, html="<html>maintenance</html>"))
    assert fetch(html, tmp_path).source == "cache"


@pytest.mark.parametrize("garbage", [b"{not json", b'{"manifest": {}, "initial_peers": [], "fetched_at": 1}',
                                     b"\x00\xff" * 10, b"[]"])
def test_corrupt_cache_is_reported_and_left_alone(tmp_path: Path, garbage: bytes) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    path = cache_path(tmp_path, url)
    path.write_bytes(garbage)
    with pytest.raises(CoordinatorError, match="cached experiment .* is corrupt") as info:
        fetch_experiment(url, tmp_path, sleep=Sleeps(), attempts=2, timeout=2.0)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == garbage


def test_unwritable_cache_does_not_fail_a_good_fetch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="volunteer.core.seed_client"):
        assert fetch(mock(good)[0], blocker / "cache").source == "coordinator"
    assert "could not cache" in caplog.text


def test_invalid_urls_are_refused(tmp_path: Path) -> None:
    for url in ("ftp://127.0.0.1/", "127.0.0.1:8470", "http://"):
        with pytest.raises(CoordinatorError, match="coordinator URL"):
            fetch_experiment(url, tmp_path, sleep=Sleeps())


def test_experiment_from_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(default_manifest().to_json())
    experiment = experiment_from_file(path, ["/ip4/127.0.0.1/tcp/1/p2p/QmXrPbzKT1gnMfAVgLY6ANgk2xKHzHBCMXjVEC5oUJsvSh"])
    assert experiment.source == "file" and experiment.manifest == default_manifest()
    with pytest.raises(CoordinatorError, match="initial peers"):
        experiment_from_file(path, ["not-a-maddr"])


# --- paths ----------------------------------------------------------------------------------------


def test_paths_follow_volunteer_home(volunteer_home: Path) -> None:
    paths = default_paths()
    assert paths == Paths(*(volunteer_home / d for d in ("config", "data", "cache", "state", "runtime")))
    assert not volunteer_home.exists()  # nothing is created until asked
    paths.ensure()
    assert all(p.is_dir() and (p.stat().st_mode & 0o777) == 0o700 for p in (paths.config_dir, paths.runtime_dir))


def test_paths_default_to_platform_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOLUNTEER_HOME")
    paths = default_paths("some-app")
    assert all("some-app" in str(p) for p in (paths.config_dir, paths.data_dir, paths.cache_dir))


def test_peers_the_daemon_could_not_parse_never_replace_the_cached_ones(tmp_path: Path) -> None:
    """Issue 12.5: a /v1/peers answer of garbage multiaddrs passed the old check, replaced the last good
    peers in the cache, and only then failed in the p2p daemon."""
    transport, _ = mock(good)
    first = fetch(transport, tmp_path)
    cached = cache_path(tmp_path, URL).read_bytes()
    bad, _ = mock(good, lambda n: httpx.Response(200, json={"maddrs": ["/ip4/1.2.3.4/tcp/4001/p2p/QmSeed"]}))
    again = fetch(bad, tmp_path)
    assert again.initial_peers == first.initial_peers and again.source == "cache"
    assert cache_path(tmp_path, URL).read_bytes() == cached


@pytest.mark.integration
def test_seed_dials_back_only_the_asking_address(seed: SeedProcess) -> None:
    from volunteer.core.seed_client import dial_back

    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        open_port, closed_port = listening.getsockname()[1], closed.getsockname()[1]
        answer = dial_back(seed.url, [open_port, closed_port])
    assert answer.observed_host == "127.0.0.1"
    assert answer.open_ports == (open_port,)
    for bad in ("port=0", "port=70000", "port=x"):
        assert httpx.get(f"{seed.url}/v1/dialback?{bad}", timeout=5.0).status_code == 400
