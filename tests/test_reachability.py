"""How a volunteer says it is reached: the pure classification, the seed's dial-back as a client sees it,
and the watcher's reports (fakes passed in: no network). The real thing runs in tests/test_netlab.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from volunteer.core.seed_client import CoordinatorError, DialBack, dial_back
from volunteer.node.reachability import (
    SETTLED_PERIOD,
    SETTLED_TICKS,
    Reach,
    ReachWatch,
    advice,
    classify,
)


@pytest.mark.parametrize("dialled_back, trainers, connected, relayed, expected", [
    (True, 0, 0, False, Reach.DIRECT),
    (True, 3, 0, False, Reach.DIRECT),  # dialable: trainers dial us, whatever we hold
    (False, 2, 1, False, Reach.OUTBOUND),
    (False, 2, 0, True, Reach.RELAYED),
    (False, 2, 0, False, Reach.UNREACHABLE),
    (False, 0, 0, False, Reach.OUTBOUND),  # nobody to dial yet: we will when a trainer appears
    (None, 0, 0, False, Reach.CHECKING),
    (None, 1, 1, False, Reach.OUTBOUND),
])
def test_classify(dialled_back, trainers, connected, relayed, expected):
    assert classify(dialled_back, trainers, connected, relayed) is expected
    # no bootstrap peer answers (the uplink is down): nobody reaches us, whatever held before
    assert classify(dialled_back, trainers, connected, relayed, offline=True) is Reach.UNREACHABLE


def test_advice_names_the_port_to_forward_and_the_address_to_announce():
    line = advice(Reach.OUTBOUND, "192.0.0.131", 40123, 2, 2)
    assert "2 of 2 trainers" in line and "--port 40123 --announce-host 192.0.0.131" in line
    assert "directly" in advice(Reach.DIRECT, "192.0.0.131", 40123, 1, 0)
    assert "forward TCP port 31337" in advice(Reach.UNREACHABLE, None, 31337, 1, 0)
    assert "network connection" in advice(Reach.UNREACHABLE, None, 31337, 1, 0, offline=True)


def _transport(body: object, status: int = 200) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/dialback"
        return httpx.Response(status, content=json.dumps(body).encode(), headers={"content-type": "application/json"})

    return httpx.MockTransport(answer)


def test_dial_back_reads_the_seeds_answer():
    answer = dial_back("http://seed.example", [4001], transport=_transport({"observed_host": "192.0.0.131",
                                                                            "open_ports": [4001]}))
    assert answer == DialBack("192.0.0.131", (4001,))


@pytest.mark.parametrize("body", [
    {"observed_host": "x", "open_ports": ["4001"]},
    {"observed_host": 5, "open_ports": []},
    {"open_ports": []},
    {"observed_host": "x" * 100, "open_ports": []},
    {"observed_host": "x", "open_ports": list(range(10))},
    [],
])
def test_dial_back_refuses_malformed_answers(body):
    with pytest.raises(CoordinatorError, match="dial-back"):
        dial_back("http://seed.example", [4001], transport=_transport(body))


def test_dial_back_of_a_seed_without_the_endpoint_is_one_error():
    with pytest.raises(CoordinatorError, match="dial-back"):
        dial_back("http://seed.example", [4001], transport=_transport({"detail": "Not Found"}, 404))


class FakeEvents:
    def __init__(self):
        self.lines: list[tuple[str, dict]] = []

    def emit(self, event: str, message: str, **fields) -> None:
        self.lines.append((event, fields))


class FakeLinks:
    def __init__(self, *ticks: tuple[int, int]):
        self.ticks = list(ticks)
        self.calls = 0

    def tick(self) -> tuple[int, int]:
        self.calls += 1
        return self.ticks.pop(0) if len(self.ticks) > 1 else self.ticks[0]


def _node(coordinator: str | None = "http://seed.example"):
    return SimpleNamespace(
        settings=SimpleNamespace(coordinator=coordinator, dial_trainers=True),
        info=SimpleNamespace(maddrs=("/ip4/10.1.0.2/tcp/40123/p2p/Qm", "/ip4/127.0.0.1/tcp/40123/p2p/Qm"),
                             peer_id="Qm"),
        events=FakeEvents(),
        dht=None, manifest=SimpleNamespace(dht_prefix="x"), experiment=SimpleNamespace(initial_peers=()),
    )


def test_a_natted_volunteer_reports_outbound_once_it_holds_a_trainer(monkeypatch):
    monkeypatch.setattr("volunteer.core.records.publish_reach", lambda *a, **k: True)
    node = _node()
    asked: list = []
    watch = ReachWatch(node, FakeLinks((1, 0), (1, 1), (1, 1)),
                       check=lambda url, ports: asked.append(ports) or DialBack("192.0.0.131", ()))
    assert watch().reach == "unreachable"
    view = watch()
    assert view.reach == "outbound" and view.port == 40123 and view.observed_host == "192.0.0.131"
    assert watch.reading() == {"reach": view.to_dict()}  # what the supervisor folds into the stats
    assert asked == [[40123]]  # the dial-back is asked once, not at every tick
    assert [fields["reach"] for event, fields in node.events.lines if event == "reachability"] == [
        "unreachable", "outbound"]  # an event on a change only
    assert node.reach is Reach.OUTBOUND and not node.reach.announced_direct  # what its server records sign


def test_a_forwarded_port_is_direct(monkeypatch):
    monkeypatch.setattr("volunteer.core.records.publish_reach", lambda *a, **k: True)
    node = _node()
    watch = ReachWatch(node, FakeLinks((0, 0)), check=lambda url, ports: DialBack("192.0.0.131", tuple(ports)))
    assert watch().reach == "direct"
    assert node.reach is Reach.DIRECT and node.reach.announced_direct


def test_a_seed_that_cannot_dial_back_is_not_fatal(monkeypatch):
    monkeypatch.setattr("volunteer.core.records.publish_reach", lambda *a, **k: True)

    def broken(url, ports):
        raise CoordinatorError("no dial-back from http://seed.example: HTTP 404")

    watch = ReachWatch(_node(), FakeLinks((1, 1)), check=broken)
    assert watch().reach == "outbound"
    assert ReachWatch(_node(coordinator=None), FakeLinks((0, 0))).__call__().reach == "outbound"


def test_a_settled_watch_reads_the_dht_every_settled_period_and_wakes_up_on_a_change(monkeypatch):
    """Idle CPU (issue 16): a view that stays the same is read again every 20 s, not every 5 s tick."""
    published: list[float] = []
    monkeypatch.setattr("volunteer.core.records.publish_reach", lambda *a, **k: published.append(now[0]) or True)
    now = [0.0]
    links = FakeLinks(*[(1, 1)] * (SETTLED_TICKS + 1), (2, 1), (2, 2))
    watch = ReachWatch(_node(), links, check=lambda url, ports: DialBack("192.0.0.131", ()), clock=lambda: now[0])
    for _ in range(SETTLED_TICKS):  # the same view, tick after tick
        assert watch().reach == "outbound"
        now[0] += 5.0
    assert links.calls == SETTLED_TICKS
    now[0] += SETTLED_PERIOD - 15.0
    assert watch().connected == 1 and links.calls == SETTLED_TICKS  # settled: no DHT read this tick
    now[0] += 10.0
    assert watch().connected == 1 and links.calls == SETTLED_TICKS + 1  # its period is up: read again
    assert published[-1] == now[0]  # and the reach record (60 s to live) is renewed at each settled read
    now[0] += SETTLED_PERIOD
    assert watch().trainers == 2 and links.calls == SETTLED_TICKS + 2  # a new trainer: a change
    now[0] += 5.0
    assert watch().connected == 2 and links.calls == SETTLED_TICKS + 3  # ... so the next tick reads again


def test_status_and_dashboard_show_how_the_volunteer_is_reached():
    import io

    from rich.console import Console

    from volunteer.node.stats import NodeState, StatsSnapshot
    from volunteer.views.dashboard import _header
    from volunteer.views.monitor import summary_lines

    reach = dict(reach="outbound", advice="not reachable from the internet; holding connections to 1 of 1 trainers",
                 observed_host="192.0.0.131", port=40123, trainers=1, connected=1)
    snapshot = StatsSnapshot(time=10.0, experiment="lab", peer_id="Qm", state=NodeState.SERVING, device="cpu", started=0.0,
                             reach=reach)
    assert StatsSnapshot.from_dict(snapshot.to_dict()).reach == reach
    assert any(line.startswith("reached: outbound (not reachable") for line in summary_lines(snapshot))
    console = Console(file=io.StringIO(), width=120)
    console.print(_header(snapshot, 120))
    assert "reached outbound" in console.file.getvalue()
