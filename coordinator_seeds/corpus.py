"""The trainer's corpus: the Python standard library's own source, read as bytes.

It is real text, present on every machine that runs the trainer, so training needs no download. Files
are read in sorted order and the corpus is capped, so the same interpreter always gives the same bytes.
The model is byte-level: the vocabulary is the 256 byte values.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path
from typing import Iterator

import torch

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 8 * 2**20
HELD_OUT_FRACTION = 0.05
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # installed packages differ between machines


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's ``*.py`` files, sorted by relative path for determinism."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=4)
def load_stdlib(max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """The corpus as a ``uint8`` tensor of at most ``max_bytes`` bytes (files joined by blank lines)."""
    chunks, total = [], 0
    for path in stdlib_sources():
        try:
            body = path.read_bytes() + b"\n\n"
        except OSError:  # an unreadable file (permissions, a dangling link) is simply not part of it
            continue
        chunks.append(body)
        total += len(body)
        if total >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    if len(data) < 2:
        raise RuntimeError("the standard library sources could not be read: no corpus")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def split(data: torch.Tensor, held_out: float = HELD_OUT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)``: the last ``held_out`` fraction is kept for evaluation loss."""
    cut = len(data) - max(1, int(len(data) * held_out))
    return data[:cut], data[cut:]


def batches(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(inputs, targets)`` pairs of random windows, ``int64 [batch_size, seq_len]``;
    ``targets`` is ``inputs`` shifted one byte ahead."""
    if len(data) < seq_len + 1:
        raise ValueError(f"corpus of {len(data)} bytes is shorter than one window of {seq_len + 1}")
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(data) - seq_len, (batch_size, 1), generator=generator)
        windows = data[starts + offsets].long()
        yield windows[:, :-1], windows[:, 1:]
