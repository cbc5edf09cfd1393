"""Expert checkpoints: one file per expert, replaced atomically, the previous one kept until the new one is whole.

hivemind's own ``CheckpointSaver`` writes a new full file every period and never deletes any (see
ENGINE-NOTES), and saves nothing at shutdown, so the volunteer keeps its own policy:

    <dir>/<uid>.pt       the latest whole checkpoint
    <dir>/<uid>.prev.pt  the one before it, used if the latest is unreadable

Files are loaded with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from volunteer.core.files import move_aside
from volunteer.core.paths import fsync_dir, write_atomic

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExpertCheckpoint:
    uid: str
    expert_type: str
    module: dict[str, Any]
    optimizer: dict[str, Any] | None
    updates: int  # optimizer steps this expert has taken over its whole life


class CheckpointStore:
    def __init__(self, directory: Path):
        self.directory = directory

    def sweep(self) -> int:
        """Delete temporary files a killed writer left (write_atomic's ``.<name>.<pid>.tmp``)."""
        swept = 0
        for tmp in self.directory.glob(".*.tmp") if self.directory.is_dir() else ():
            tmp.unlink(missing_ok=True)
            swept += 1
        return swept

    def _latest(self, uid: str) -> Path:
        return self.directory / f"{uid}.pt"

    def _previous(self, uid: str) -> Path:
        return self.directory / f"{uid}.prev.pt"

    def save(self, checkpoint: ExpertCheckpoint) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = dict(
            format=FORMAT_VERSION, uid=checkpoint.uid, expert_type=checkpoint.expert_type,
            module=checkpoint.module, optimizer=checkpoint.optimizer, updates=checkpoint.updates,
        )
        latest, previous = self._latest(checkpoint.uid), self._previous(checkpoint.uid)
        staged = latest.with_name(f"{latest.name}.new")
        write_atomic(staged, lambda f: torch.save(payload, f))
        # only now that the new file is whole does the old one step back
        if latest.exists():
            os.replace(latest, previous)
        os.replace(staged, latest)
        fsync_dir(self.directory)
        return latest

    def load(self, uid: str, expert_type: str) -> ExpertCheckpoint | None:
        """The newest readable checkpoint of ``uid``; unreadable files are moved aside with a warning."""
        # a crash between save()'s two renames leaves no <uid>.pt but a whole, newer .new than .prev
        for path in (self._latest(uid), self._latest(uid).with_name(f"{uid}.pt.new"), self._previous(uid)):
            if not path.exists():
                continue
            try:
                return self._read(path, uid, expert_type)
            except Exception as e:  # a truncated zip, a wrong type, a foreign file: all mean "not usable"
                move_aside(path, "checkpoint", e)
        return None

    @staticmethod
    def _read(path: Path, uid: str, expert_type: str) -> ExpertCheckpoint:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise ValueError("not a volunteer checkpoint")
        if data.get("uid") != uid or data.get("expert_type") != expert_type:
            raise ValueError(f"holds {data.get('uid')}/{data.get('expert_type')}, expected {uid}/{expert_type}")
        return ExpertCheckpoint(uid, expert_type, data["module"], data.get("optimizer"), int(data.get("updates", 0)))
