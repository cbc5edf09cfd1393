"""What a new user meets in their first hour (issue 15): help that reads at 80 columns, a status that
answers at once, commands whose every option says what it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

STATUS_WITH_NOTHING_RUNNING = """
import sys
from volunteer.cli import main
sys.argv = ["volunteer", "status"]
try:
    main()
except SystemExit as e:
    code = e.code
print("heavy:", sorted(m for m in ("torch", "hivemind") if m in sys.modules), "code:", code)
"""


def test_status_with_nothing_running_loads_neither_torch_nor_hivemind(tmp_path: Path) -> None:
    """It took 2-4 s only to import them for an error class it could not have met."""
    env = {**os.environ, "VOLUNTEER_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", STATUS_WITH_NOTHING_RUNNING], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "heavy: [] code: 2", done.stdout + done.stderr
    assert done.stderr.startswith("error: no volunteer is running"), done.stderr


@pytest.mark.parametrize("argv", [
    ["volunteer.cli", "--help"], ["volunteer.cli", "start", "--help"], ["volunteer.cli", "hardware", "--help"],
    ["volunteer.cli", "config", "--help"], ["coordinator_seeds.cli", "--help"], ["coordinator_seeds.cli", "run", "--help"],
    ["coordinator_seeds.cli", "train", "--help"],
])
def test_help_at_80_columns_shows_whole_option_names_and_help_for_each(argv: list[str]) -> None:
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "<bool>" not in text and "…" not in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    # every option line carries words after its name (a help text), or continues one
    options = [line for line in text.splitlines() if line.startswith("  -")]
    bare = [line for line in options if len(line.split(maxsplit=1)) == 1
            or line.split(maxsplit=1)[1].startswith("<") and len(line.split()) == 2]
    assert not bare, bare
