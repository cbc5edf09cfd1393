"""How many versions of an expert a server keeps for audits, and what they take: plain arithmetic, apart
from ``serving.versions`` (torch, hivemind) so that the memory plan, and the light commands that read it
(``volunteer status``), can size them without importing either."""

from __future__ import annotations

KEEP_VERSIONS = 16
KEEP_FOR = 60.0  # seconds; a trainer asks within a step or two of the answer
# Host memory one expert's kept versions may take: a large expert keeps fewer versions (each one is a
# copy of its weights and optimizer state), never fewer than a trained version and its parent.
AUDIT_MEMORY_CAP = 256 * 2**20
MIN_VERSIONS = 2


def version_bytes(params: int, optimizer_states: int, batch_size: int, d_model: int) -> int:
    """One kept version in fp32: weights and optimizer state, and the inputs and gradients of its step."""
    return 4 * (params * (1 + optimizer_states) + 2 * batch_size * d_model)


def versions_to_keep(one_version: int) -> int:
    """How many versions an expert keeps: ``KEEP_VERSIONS``, fewer where they would exceed the cap."""
    return max(MIN_VERSIONS, min(KEEP_VERSIONS, AUDIT_MEMORY_CAP // max(1, one_version)))
