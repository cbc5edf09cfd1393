"""The leaderboard of verified contributions: what trusted trainers saw each volunteer's experts answer.

A volunteer counts its own work, but any peer can claim anything. The trainer counts, per server
peer, the samples whose answers came back well-formed (``dispatch.BatchedRemoteMoE.answered``) and
publishes these running totals, one record per training run, signed with its key
(``swarm.publish_contributions``). The seed reads them from the DHT, keeps only those signed by a key
it trusts (by default the trainer key in its own data dir, which ``coordinator-seed train`` on the same
machine uses), adds the runs up and keeps the result in a state file, written atomically.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from volunteer.core.expert_records import AuditVerdicts
from volunteer.core.files import DurableJSON
from volunteer.core.records import Contributions, key_fingerprint

logger = logging.getLogger("coordinator_seeds.leaderboard")
FOLD_AFTER = 3600.0  # a run silent this long is added to the totals and forgotten
MAX_FOLDED_RUNS = 10_000  # run ids remembered after folding, so a late record is not counted twice


@dataclass(frozen=True)
class Entry:
    peer_id: str
    forward_samples: int
    backward_samples: int
    first_seen: float  # when a trusted trainer first saw an answer from it (trainer's clock)
    last_seen: float
    audited: int = 0  # calls of it that trusted trainers audited, and how many passed
    passed: int = 0
    banned: bool = False  # it failed an audit: its credit is void

    @property
    def samples(self) -> int:
        return 0 if self.banned else self.forward_samples + self.backward_samples

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples": self.samples}


class Leaderboard:
    """Totals per volunteer peer id over every run of every trusted trainer."""

    def __init__(self, path: Path, trusted: Collection[bytes]):
        self.path, self.trusted = path, frozenset(trusted)
        self.file = DurableJSON(path, "leaderboard")
        self.folded: dict[str, list[int]] = {}  # peer -> [forward, backward] of finished runs
        # run -> {"time": its latest record's time (trainer's clock), "updated": when we took it (ours),
        #         "peers": {peer: [forward, backward]}}
        self.runs: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, list[float]] = {}  # peer -> [first, last]
        self.folded_runs: list[str] = []
        self._lock = threading.Lock()  # merged in a worker thread, read by HTTP handlers on the trio thread
        self.ignored: set[bytes] = set()  # untrusted keys already reported, so each is logged once
        self.audits = Audits()
        self._load()

    def merge(self, records: Iterable[Contributions], now: float | None = None) -> bool:
        """Take the newest totals of each trusted run; returns whether anything changed."""
        now = time.time() if now is None else now
        with self._lock:
            return self._merge(records, now)

    def _merge(self, records: Iterable[Contributions], now: float) -> bool:
        changed = False
        for record in records:
            if record.owner not in self.trusted:
                self._report_untrusted(record.owner)
                continue
            if record.run in self.folded_runs or not math.isfinite(record.time):
                continue
            run = self.runs.setdefault(record.run, {"time": -math.inf, "updated": now, "peers": {}})
            if record.time <= run["time"]:
                continue  # the same record again, or an older one
            run["time"], run["updated"] = record.time, now
            for peer, counts in record.peers.items():
                before = run["peers"].get(peer, [0, 0])
                after = [max(b, c) for b, c in zip(before, counts)]  # a run's totals never shrink
                if after != before:
                    run["peers"][peer] = after
                    first, _last = self.seen.get(peer, [record.time, record.time])
                    self.seen[peer] = [min(first, record.time), record.time]
            changed = True
        return self._fold(now) or changed

    def _report_untrusted(self, owner: bytes) -> None:
        # a trainer started with another key than the one this seed trusts earns its volunteers
        # nothing, and nobody would know: say it once per key
        if owner not in self.ignored:
            self.ignored.add(owner)
            trusted = ", ".join(sorted(key_fingerprint(t) for t in self.trusted))
            logger.warning(f"ignoring contributions signed by trainer key {key_fingerprint(owner)}: this seed "
                           f"trusts only {trusted} (give the trainer that key with --key, or start the seed "
                           f"with --trainer-key)")

    def merge_audits(self, verdicts: Iterable[AuditVerdicts]) -> bool:
        """Take the trusted trainers' audit verdicts; returns whether anything changed."""
        with self._lock:
            return self.audits.merge(v for v in verdicts if v.owner in self.trusted)

    def banned(self) -> tuple[set[str], set[str]]:
        """The keys and the peers that failed a trusted trainer's audit (what the seed publishes)."""
        with self._lock:
            return set(self.audits.banned_keys), set(self.audits.banned_peers)

    def entries(self) -> list[Entry]:
        """Every volunteer a trusted trainer saw answer, most samples first."""
        with self._lock:
            return self._entries()

    def _entries(self) -> list[Entry]:
        totals = {peer: list(counts) for peer, counts in self.folded.items()}
        for run in self.runs.values():
            _add(totals, run["peers"])
        for peer in self.audits.banned_peers:  # listed as banned even if no trusted trainer credited it
            totals.setdefault(peer, [0, 0])
        entries = [Entry(peer, f, b, *self.seen.get(peer, [0.0, 0.0]), *self.audits.of(peer))
                   for peer, (f, b) in totals.items()]
        return sorted(entries, key=lambda e: (-e.samples, e.peer_id))

    def save(self) -> None:
        with self._lock:
            state = dict(version=1, folded=self.folded, runs=self.runs, seen=self.seen, folded_runs=self.folded_runs,
                         audits=self.audits.to_dict())
        self.file.save(state)

    def _fold(self, now: float) -> bool:
        done = [run for run, data in self.runs.items() if data["updated"] < now - FOLD_AFTER]
        for run in done:
            _add(self.folded, self.runs.pop(run)["peers"])
        self.folded_runs = (self.folded_runs + done)[-MAX_FOLDED_RUNS:]
        return bool(done)

    def _load(self) -> None:
        # the totals are the volunteers' history: an unreadable file is kept aside for a person to see
        state = self.file.load(_checked)
        if state is not None:
            self.folded, self.runs, self.seen, self.folded_runs, self.audits = state


def _add(totals: dict[str, list[int]], peers: dict[str, list[int]]) -> None:
    """Add a run's [forward, backward] per peer into ``totals``."""
    for peer, (forward, backward) in peers.items():
        total = totals.setdefault(peer, [0, 0])
        total[0] += forward
        total[1] += backward


class Audits:
    """Per trainer run and peer, the calls audited and passed (a run's counts never shrink), and the
    keys and peers that failed once: banned for good (a person may unban by editing the state file)."""

    def __init__(self, runs: dict[str, dict[str, list[int]]] | None = None, banned_keys: set[str] | None = None,
                 banned_peers: set[str] | None = None):
        self.runs = runs or {}
        self.banned_keys, self.banned_peers = banned_keys or set(), banned_peers or set()

    def merge(self, verdicts: Iterable[AuditVerdicts]) -> bool:
        changed = False
        for verdict in verdicts:
            run = self.runs.setdefault(verdict.run, {})
            for peer, counts in verdict.peers.items():
                after = [max(b, c) for b, c in zip(run.get(peer, [0, 0]), counts)]
                changed |= after != run.get(peer)
                run[peer] = after
            new_keys, new_peers = set(verdict.failed_keys) - self.banned_keys, set(verdict.failed_peers) - self.banned_peers
            if new_keys or new_peers:
                logger.warning("banned after a failed audit: keys %s, peers %s", sorted(new_keys), sorted(new_peers))
                self.banned_keys |= new_keys
                self.banned_peers |= new_peers
                changed = True
        return changed

    def of(self, peer: str) -> tuple[int, int, bool]:
        audited = sum(run.get(peer, [0, 0])[0] for run in self.runs.values())
        passed = sum(run.get(peer, [0, 0])[1] for run in self.runs.values())
        return audited, passed, peer in self.banned_peers

    def to_dict(self) -> dict:
        return dict(runs=self.runs, banned_keys=sorted(self.banned_keys), banned_peers=sorted(self.banned_peers))

    @staticmethod
    def from_dict(d: Any) -> Audits:
        runs = {str(run): {str(p): _counts(c) for p, c in peers.items()} for run, peers in d.get("runs", {}).items()}
        return Audits(runs, {str(k) for k in d.get("banned_keys", [])}, {str(p) for p in d.get("banned_peers", [])})


def _checked(state: Any) -> tuple[dict, dict, dict, list, Audits]:
    """The state file's parts, or ValueError: every count a non-negative int, every time a float."""
    if not isinstance(state, dict) or state.get("version") != 1:
        raise ValueError("not a version 1 leaderboard")
    folded = {str(p): _counts(c) for p, c in state["folded"].items()}
    runs = {
        str(run): {"time": float(data["time"]), "updated": float(data["updated"]),
                   "peers": {str(p): _counts(c) for p, c in data["peers"].items()}}
        for run, data in state["runs"].items()
    }
    seen = {str(p): [float(t[0]), float(t[1])] for p, t in state["seen"].items()}
    folded_runs = [str(run) for run in state["folded_runs"]]
    return folded, runs, seen, folded_runs, Audits.from_dict(state.get("audits", {}))


def _counts(value: Any) -> list[int]:
    if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int and v >= 0 for v in value)):
        raise ValueError(f"bad counts {value!r:.40}")
    return list(value)
