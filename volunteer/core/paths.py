"""Where the client keeps its files: the platform's usual places, or all under ``VOLUNTEER_HOME``.

One environment variable moves everything, so tests (and portable installs) never touch the real
home directory. Directories are created by whoever writes into them, via ``Paths.ensure``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import platformdirs

HOME_ENV = "VOLUNTEER_HOME"


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    data_dir: Path
    cache_dir: Path
    state_dir: Path
    runtime_dir: Path

    def ensure(self) -> Paths:
        """Create every directory; private (0o700) because they hold identity keys and checkpoints."""
        for directory in astuple(self):
            make_private_dirs(directory)
        return self


def make_private_dirs(directory: Path) -> None:
    """``mkdir -p`` with every directory it creates at 0o700, parents included.

    ``Path.mkdir(parents=True)`` gives missing parents the umask's mode (0755): a missing
    ``XDG_RUNTIME_DIR`` made that way fails platformdirs' check (the XDG spec wants 0700), so the next
    ``volunteer status`` would look for the control socket elsewhere and find no client."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # another process made it between the check and here
            continue
        path.chmod(0o700)  # mkdir's mode is masked by the umask


def default_paths(app: str = "hivemind-volunteer") -> Paths:
    home = os.environ.get(HOME_ENV)
    if home:
        base = Path(home).expanduser().absolute()
        return Paths(base / "config", base / "data", base / "cache", base / "state", base / "runtime")
    dirs = platformdirs.PlatformDirs(app, appauthor=False)
    with warnings.catch_warnings():
        # Headless servers and containers rarely set XDG_RUNTIME_DIR; platformdirs then falls back to a
        # private per-user directory it has checked, which is all we need, so its warning is only noise.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        runtime_dir = dirs.user_runtime_path
    return Paths(
        config_dir=dirs.user_config_path,
        data_dir=dirs.user_data_path,
        cache_dir=dirs.user_cache_path,
        state_dir=dirs.user_state_path,
        runtime_dir=runtime_dir,
    )


def write_atomic(path: Path, write: Any, *, replace: bool = True) -> bool:
    """Write through ``write(file)`` to a temporary file, fsync it, then rename it over ``path``.

    ``replace=False``: link it into place instead, never replacing a ``path`` that exists (a key
    another process just made); returns False, writing nothing, if it did."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
