"""When a serving volunteer should move: give up a uid others also serve for one the swarm serves least.

A pure function of the swarm's served throughput per uid (``swarm.served_throughput``), what this
volunteer serves, and optionally server counts and expert types; the supervisor asks it every
``rebalance_period`` (randomised) and restarts the node with the new uids when it says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from volunteer.planning.choice import finite_rate


@dataclass(frozen=True)
class Rebalance:
    """Swap ``drop[i]`` for ``take[i]``; empty (falsy) when staying put is best."""

    drop: tuple[str, ...] = ()
    take: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.drop)


def rebalance_moves(
    my_uids: Iterable[str],
    swarm_throughput: Mapping[str, float],
    my_throughput: Mapping[str, float],
    margin: float = 0.5,
    *,
    server_counts: Mapping[str, int] | None = None,
    expert_types: Mapping[str, str] | None = None,
) -> Rebalance:
    """Which of my uids to give up for which others, so that the swarm's weakest uids get served.

    ``swarm_throughput``: uid -> samples/s served in the swarm, mine included, for every uid of the
    grid (0 if unserved); ``my_throughput``: what I serve of each of my uids, assumed to move with me.
    A swap needs a clear case: the target gets less than ``margin`` x what my donor uid gets, the
    donor keeps another server (others serve it > 0 samples/s, and >= 2 servers if ``server_counts``
    is given), and both end above the target's old level, so every swap strictly raises the sorted
    coverage (the minimum, then the next) and no swap can undo another. ``expert_types`` (uid -> type)
    keeps swaps within one type, so the memory plan still holds. Deterministic: ties go by uid.
    """
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    mine = list(dict.fromkeys(my_uids))
    gain = {uid: finite_rate(my_throughput.get(uid, 0.0)) for uid in mine}
    cover = {uid: finite_rate(rate) for uid, rate in swarm_throughput.items()}
    for uid in mine:
        cover[uid] = max(cover.get(uid, 0.0), gain[uid])
    counts = {uid: server_counts.get(uid, 0) for uid in mine} if server_counts is not None else None
    types = expert_types or {}
    drop: list[str] = []
    take: list[str] = []

    def find_move() -> tuple[str, str] | None:
        # uids moved in this call stay put: that bounds the loop and keeps swaps from undoing each other
        donors = sorted(
            (u for u in mine if u not in drop and gain[u] > 0 and (counts is None or counts[u] >= 2)),
            key=lambda u: (-cover[u], u),
        )
        for target in sorted((u for u in cover if u not in mine and u not in take), key=lambda u: (cover[u], u)):
            if not donors or cover[target] >= margin * cover[donors[0]]:
                return None  # targets only get better covered from here, donors only worse
            for donor in donors:
                if cover[target] >= margin * cover[donor]:
                    break
                same_type = expert_types is None or types.get(donor) == types.get(target)
                if same_type and cover[donor] - gain[donor] > cover[target]:
                    return donor, target
        return None

    while (move := find_move()) is not None:
        donor, target = move
        cover[donor] -= gain[donor]
        cover[target] += gain[donor]
        drop.append(donor)
        take.append(target)
    return Rebalance(tuple(drop), tuple(take))
