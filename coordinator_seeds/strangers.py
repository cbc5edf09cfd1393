"""What a trainer does about strangers in the swarm, in one place: it routes only to signed servers
(``replicas``), audits a sample of their answers (``audit``), ignores banned keys (the seed's signed
list and its own failed audits), credits only servers whose audits passed, and publishes its verdicts.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Collection

from hivemind import DHT

from coordinator_seeds.audit import Auditor, AuditSettings
from coordinator_seeds.replicas import (
    ReplicatedGridMoE,
    ReplicatedRemoteMoE,
    replicated_moe,
)
from volunteer.core.audit_check import ExpertSpec
from volunteer.core.expert_records import NOBODY, Banned, publish_audits, read_banned
from volunteer.core.manifest import Manifest, MoELayer
from volunteer.core.records import owner_subkey
from volunteer.core.wire import rounding_rtol

logger = logging.getLogger("coordinator_seeds.strangers")
BANS_PERIOD = 15.0  # seconds between reads of the seed's ban list


def expert_specs(manifest: Manifest) -> dict[str, ExpertSpec]:
    """How to rebuild each uid's expert to recompute an audited call."""
    specs = {}
    for layer in manifest.layers:
        kind = manifest.expert_type_of(layer.uids()[0])
        spec = ExpertSpec(kind.block, manifest.d_model, kind.d_hidden, manifest.optimizer.name, manifest.optimizer.lr)
        specs.update(dict.fromkeys(layer.uids(), spec))
    return specs


def wire_tolerance(audit: AuditSettings, manifest: Manifest) -> AuditSettings:
    """``audit`` with its tolerance widened by the wire's rounding: an honest answer comes back rounded
    to the experiment's wire dtype, and the recomputation it is checked against is not."""
    tolerance = audit.tolerance
    return replace(audit, tolerance=replace(tolerance, rtol=tolerance.rtol + rounding_rtol(manifest.wire_dtype)))


class TrustedSwarm:
    """One trainer's view of who may serve it and who earned credit."""

    def __init__(self, manifest: Manifest, dht: DHT, audit: AuditSettings | None,
                 trusted_ban_keys: Collection[bytes | str] = ()):
        self.manifest, self.dht = manifest, dht
        self.auditor = Auditor(expert_specs(manifest), wire_tolerance(audit, manifest)) if audit is not None else None
        self.trusted = frozenset(trusted_ban_keys) | {owner_subkey(dht)}
        self._bans: Banned = NOBODY
        self._bans_read = -float("inf")
        self._lock = threading.Lock()

    def make_moe(self, d_model: int, layer: MoELayer, dht: DHT, k_best: int, forward_timeout: float,
                 backward_timeout: float, max_batch_size: int) -> ReplicatedRemoteMoE | ReplicatedGridMoE:
        """The trainer's layer: ``dispatch.remote_moe``'s choice (flat gate or grid beam search) over
        signed servers, with replicas, failover and audits."""
        return replicated_moe(d_model, layer, dht, self.manifest.dht_prefix, k_best, forward_timeout,
                              backward_timeout, max_batch_size=max_batch_size, auditor=self.auditor,
                              banned=self.banned)

    def banned(self) -> frozenset[str]:
        """The seed's ban list (read at most every ``BANS_PERIOD``) and our own failed audits."""
        with self._lock:
            if time.monotonic() - self._bans_read >= BANS_PERIOD:
                self._bans_read = time.monotonic()
                try:
                    self._bans = read_banned(self.dht, self.manifest.dht_prefix, self.trusted)
                except Exception as e:  # keep the list we had
                    logger.warning("reading the ban list failed: %s", e)
            seed = frozenset(self._bans)
        return seed | (self.auditor.banned() if self.auditor is not None else frozenset())

    def credited(self, answered: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """The answered samples of peers whose audits passed (all of them when audits are off)."""
        if self.auditor is None:
            return answered
        return {peer: counts for peer, counts in answered.items() if self.auditor.credited(peer)}

    def publish(self, run: str) -> bool:
        if self.auditor is None:
            return True
        keys, peers = self.auditor.failed()
        return publish_audits(self.dht, self.manifest.dht_prefix, run, self.auditor.verdicts(), keys, peers)

    def finish(self, timeout: float = 30.0) -> None:
        if self.auditor is not None:
            self.auditor.wait_idle(timeout)

    def shutdown(self) -> None:
        if self.auditor is not None:
            self.auditor.shutdown()
