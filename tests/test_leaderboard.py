"""The leaderboard of verified contributions: merging trainers' records, its state file, and a real swarm.

The last test runs a seed, a volunteer and a trainer on loopback: the seed lists the volunteer with
the samples the trainer saw it answer, never more than the volunteer counted itself, and ignores a
record signed by a trainer it does not trust.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import httpx
import pytest

from coordinator_seeds.leaderboard import FOLD_AFTER, Leaderboard
from tests.conftest import TEST_MANIFEST, Processes, serving_event, status, wait_for
from volunteer.core import records
from volunteer.core.records import Contributions

TRUSTED, ROGUE = b"[owner:trusted]", b"[owner:rogue]"


def record(run: str, t: float, owner: bytes = TRUSTED, **peers: tuple[int, int]) -> Contributions:
    return Contributions(owner, run, dict(peers), t)


def totals(board: Leaderboard) -> dict[str, tuple[int, int]]:
    return {e.peer_id: (e.forward_samples, e.backward_samples) for e in board.entries()}


def test_runs_add_up_and_only_trusted_trainers_count(tmp_path: Path):
    board = Leaderboard(tmp_path / "leaderboard.json", [TRUSTED])
    assert board.merge([record("run1", 10.0, a=(5, 5), b=(1, 0)), record("run2", 10.0, a=(3, 2))], now=10.0)
    assert board.merge([record("run1", 20.0, a=(9, 8))], now=20.0)  # a run's totals grow: the newest replaces
    old_news = [record("run1", 20.0, a=(9, 8)), record("run1", 15.0, a=(100, 100))]
    assert not board.merge(old_news, now=21.0)
    assert not board.merge([record("run3", 30.0, ROGUE, a=(10**9, 10**9), c=(7, 7))], now=30.0)
    assert totals(board) == {"a": (12, 10), "b": (1, 0)}
    assert [e.peer_id for e in board.entries()] == ["a", "b"]  # most samples first
    [a, _b] = board.entries()
    assert (a.first_seen, a.last_seen, a.samples) == (10.0, 20.0, 22)


def test_a_run_never_goes_backwards(tmp_path: Path):
    board = Leaderboard(tmp_path / "leaderboard.json", [TRUSTED])
    board.merge([record("run1", 10.0, a=(9, 9))], now=10.0)
    board.merge([record("run1", 11.0, a=(4, 12))], now=11.0)  # a restarted trainer reusing a run id, say
    assert totals(board) == {"a": (9, 12)}


def test_quiet_runs_are_folded_and_not_counted_again(tmp_path: Path):
    board = Leaderboard(tmp_path / "leaderboard.json", [TRUSTED])
    board.merge([record("run1", 10.0, a=(5, 5))], now=11.0)
    assert board.merge([], now=11.0 + FOLD_AFTER + 1)
    assert board.runs == {} and board.folded == {"a": [5, 5]} and totals(board) == {"a": (5, 5)}
    board.merge([record("run1", 12.0, a=(6, 6))], now=11.0 + FOLD_AFTER + 2)  # a late copy of a folded run
    assert totals(board) == {"a": (5, 5)}


def test_the_state_file_survives_a_restart(tmp_path: Path):
    path = tmp_path / "leaderboard.json"
    board = Leaderboard(path, [TRUSTED])
    board.merge([record("run0", 1.0, b=(1, 1))], now=1.0)
    board.merge([record("run1", 10.0, a=(5, 5))], now=2.0 + FOLD_AFTER)  # run1 stays, run0 is folded
    board.save()
    again = Leaderboard(path, [TRUSTED])
    assert totals(again) == totals(board) and again.entries() == board.entries()
    assert again.folded_runs == ["run0"]


@pytest.mark.parametrize("body", [b"\x00garbage", b'{"version": 1, "folded": {"a": [1, -1]}}', b"[]",
                                  b'{"version": 2}', b"[" * 100_000])
def test_an_unreadable_state_file_is_kept_aside(tmp_path: Path, body: bytes, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "leaderboard.json"
    path.write_bytes(body)
    with caplog.at_level(logging.WARNING, logger="volunteer.core.files"):
        board = Leaderboard(path, [TRUSTED])
    assert board.entries() == [] and not path.exists()
    [aside] = tmp_path.glob("leaderboard.json.corrupt-*")
    assert aside.read_bytes() == body, "the old totals are a person's to recover, not ours to drop"
    [warning] = [r.getMessage() for r in caplog.records]
    assert "unreadable" in warning and "\n" not in warning


def test_records_of_an_untrusted_key_are_reported_once_per_key(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    board = Leaderboard(tmp_path / "leaderboard.json", [TRUSTED])
    with caplog.at_level(logging.WARNING, logger="coordinator_seeds.leaderboard"):
        for t in (1.0, 2.0):
            board.merge([record("r1", t, owner=b"[owner:rogue1]", a=(1, 1)),
                         record("r2", t, owner=b"[owner:rogue2]", a=(1, 1))], now=t)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("ignoring contributions" in w and "--key" in w for w in warnings)
    assert board.entries() == []


# --- a real swarm --------------------------------------------------------------------------------


@pytest.mark.integration
def test_the_seed_lists_what_a_trusted_trainer_saw(tmp_path: Path, short_home: Path):
    from coordinator_seeds.audit import AuditSettings
    from coordinator_seeds.dispatch import shutdown_dht
    from coordinator_seeds.trainer import TrainerSettings, train, untrusted_key_warning
    from volunteer.core.harness import (
        ChildProcess,
        free_port,
        start_volunteer,
        wait_http_ok,
    )
    from volunteer.core.seed_client import fetch_experiment

    manifest_file = tmp_path / "test-lm.toml"
    manifest_file.write_text(TEST_MANIFEST)
    seed_dir = tmp_path / "seed"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = Processes()

    def start_seed(period: str = "1") -> None:
        procs.add(ChildProcess("seed", [
            sys.executable, "-m", "coordinator_seeds.cli", "run", "--host", "127.0.0.1", "--http-port", str(port),
            "--experiment", str(manifest_file), "--data-dir", str(seed_dir), "--leaderboard-period", period,
        ]))
        wait_http_ok(f"{url}/healthz", timeout=90)

    def board() -> dict:
        return httpx.get(f"{url}/v1/leaderboard", timeout=10).json()

    try:
        start_seed()
        experiment = fetch_experiment(url, tmp_path / "cache")
        volunteer = procs.add(start_volunteer(short_home, url, "--max-experts", "8", name="counted"))
        peer_id = serving_event(volunteer)["peer_id"]
        assert board()["entries"] == []

        # a rogue trainer claims work for our volunteer and a made-up one: signed, but not trusted
        records.use_record_key(tmp_path / "rogue.der")  # before the DHT: its validator signs with this key
        rogue = records.join_dht(experiment.manifest.dht_prefix, experiment.initial_peers, client_mode=True)
        try:
            assert records.publish_contributions(rogue, experiment.manifest.dht_prefix, "fake",
                                               {peer_id: (10**9, 10**9), "QmNobody": (5, 5)})
        finally:
            shutdown_dht(rogue)

        # the trainer can tell at start whether the seed will count what it signs (issue 15.10)
        assert untrusted_key_warning(url, seed_dir / "trainer-key.der") is None
        warning = untrusted_key_warning(url, tmp_path / "rogue.der")
        assert warning is not None and "\n" not in warning and "--key" in warning
        # ... and the seed says once that it ignores the rogue's records
        wait_for(lambda: "ignoring contributions signed by trainer key" in "".join(procs.children[0].output), 30,
                 "the seed's warning about the untrusted key")
        assert "".join(procs.children[0].output).count("ignoring contributions signed by trainer key") == 1

        settings = TrainerSettings(experiment.manifest, experiment.initial_peers, steps=20, log_every=5,
                                   forward_timeout=5.0, backward_timeout=5.0, key_path=seed_dir / "trainer-key.der",
                                   audit=AuditSettings(rate=0.2))  # credit needs a passed audit: sure to get some
        reports = train(settings)
        assert len(reports) == 20
        entry = wait_for(lambda: next((e for e in board()["entries"] if e["peer_id"] == peer_id), None), 30,
                         "the volunteer on the leaderboard")
        assert entry["backward_samples"] > 0 and entry["forward_samples"] >= entry["backward_samples"]
        assert entry["audited"] == entry["passed"] > 0 and not entry["banned"]  # an honest volunteer, audited
        counted = status(short_home)["session"]
        # verified work is what the trainer got back: never more than the volunteer did
        assert entry["forward_samples"] <= counted["forward_samples"]
        assert entry["backward_samples"] <= counted["backward_samples"]
        assert [e["peer_id"] for e in board()["entries"]] == [peer_id], "the rogue's claims were counted"
        assert httpx.get(f"{url}/v1/leaderboard?limit=0").json() == {"experiment": "test-lm", "volunteers": 1,
                                                                     "entries": []}
        assert httpx.get(f"{url}/v1/leaderboard?limit=lots").status_code == 400
        # the volunteer shows its own line (it asks every 30 s)
        mine = wait_for(lambda: (status(short_home).get("verified") or {}).get("rank"), 45, "the volunteer's line")
        verified = status(short_home)["verified"]
        assert mine == 1 and verified["volunteers"] == 1
        assert 0 < verified["backward_samples"] <= counted["backward_samples"]

        # the totals outlive the seed: the file holds at least what it served, and a restart goes on from it
        procs.stop_all()
        saved = Leaderboard(seed_dir / "leaderboard.json", []).entries()
        assert [e.peer_id for e in saved] == [peer_id] and saved[0].samples >= entry["samples"]
        start_seed(period="600")  # it reads no record: what it lists comes from the file alone
        assert board()["entries"] == [e.to_dict() for e in saved]
    finally:
        procs.stop_all()



def test_a_key_that_failed_an_audit_is_listed_as_banned_with_no_credit(tmp_path: Path):
    from volunteer.core.expert_records import AuditVerdicts

    board = Leaderboard(tmp_path / "leaderboard.json", [TRUSTED])
    board.merge([record("run1", 10.0, honest=(50, 50), cheat=(40, 40))], now=10.0)
    verdicts = [AuditVerdicts(TRUSTED, "run1", {"honest": (3, 3), "cheat": (2, 1)}, ("k" * 16,), ("cheat",), 11.0),
                AuditVerdicts(ROGUE, "run9", {"honest": (0, 0)}, ("h" * 16,), ("honest",), 11.0)]  # untrusted: ignored
    assert board.merge_audits(verdicts)
    entries = {e.peer_id: e for e in board.entries()}
    assert (entries["honest"].samples, entries["honest"].audited, entries["honest"].passed) == (100, 3, 3)
    assert entries["cheat"].banned and entries["cheat"].samples == 0 and entries["cheat"].to_dict()["banned"]
    assert board.banned() == ({"k" * 16}, {"cheat"})
    board.save()
    again = Leaderboard(tmp_path / "leaderboard.json", [TRUSTED])
    assert again.entries() == board.entries()
