"""Where the client keeps its files, as two processes of one user must agree on them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from volunteer.core.paths import make_private_dirs

SHOW_RUNTIME = "from volunteer.core.paths import default_paths; print(default_paths().runtime_dir)"
ENSURE = "from volunteer.core.paths import default_paths; print(default_paths().ensure().runtime_dir)"


def _run(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_missing_xdg_runtime_dir_is_made_private_so_status_finds_the_same_socket_folder(tmp_path: Path):
    """Issue 15.4: ``start`` created a missing XDG_RUNTIME_DIR 0755; ``status`` then refused it and looked
    under /tmp, saying no volunteer ran while one did."""
    xdg = tmp_path / "run" / "user-1000"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(xdg), "HOME": str(tmp_path / "home")}
    env.pop("VOLUNTEER_HOME", None)
    started = _run(ENSURE, env)  # what `volunteer start` makes
    assert started.startswith(str(xdg)), started
    assert stat.S_IMODE(xdg.stat().st_mode) == 0o700
    assert _run(SHOW_RUNTIME, env) == started  # what `volunteer status` looks at


def test_make_private_dirs_makes_every_missing_level_0700_and_leaves_existing_ones(tmp_path: Path):
    tmp_path.chmod(0o755)
    target = tmp_path / "a" / "b" / "c"
    make_private_dirs(target)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a", tmp_path / "a" / "b", target)] == [0o700] * 3
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    make_private_dirs(target)  # idempotent
