"""``volunteer demo``: a whole swarm on loopback, so one command on one box shows real training.

It starts a coordinator seed, one or more ``volunteer start`` processes (each with its own home under
the demo dir) and the seed's trainer, each as a process of its own, and prints their lines prefixed
with their names while the trainer's loss falls. The volunteers run headless and speak JSON lines,
for programs; the demo shows a person each line's message, one screen line each.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from volunteer.core.harness import (
    ChildProcess,
    start_seed,
    start_trainer,
    start_volunteer,
    stop_together,
)
from volunteer.core.paths import default_paths
from volunteer.core.procgroup import become_supervisor

QUIET_LEVELS = ("DEBUG", "INFO")  # hivemind's own chatter; warnings and errors are shown


def human_line(line: str, width: int | None = None) -> str | None:
    """What a person should see of a volunteer's JSON line: an event's message, a warning's level and
    text, nothing for info logs and the periodic stats line; cut to ``width`` characters."""
    try:
        record = json.loads(line)
    except ValueError:
        return _cut(line.rstrip("\n"), width)  # not JSON: a traceback line, a print; shown as it is
    if not isinstance(record, dict):
        return _cut(line.rstrip("\n"), width)
    event, message = record.get("event"), str(record.get("message", ""))
    if event == "stats":
        return None
    if event == "log":
        level = str(record.get("level", ""))
        return None if level in QUIET_LEVELS else _cut(f"{level.lower()}: {message}", width)
    return _cut(message, width) if message else None


def _cut(text: str, width: int | None) -> str:
    return text if width is None or len(text) <= width else text[: max(width - 1, 1)] + "…"


def demo_home() -> Path:
    return default_paths().data_dir / "demo"


def run_demo(volunteers: int = 1, steps: int | None = None, fresh: bool = False) -> int:
    become_supervisor()
    home = demo_home()
    if fresh and home.exists():
        shutil.rmtree(home)  # identities, checkpoints, the leaderboard: a new swarm from scratch
    width = max(shutil.get_terminal_size().columns - len("[volunteer0] "), 40)
    children: list[ChildProcess] = []
    try:
        print(f"starting a coordinator seed, {volunteers} volunteer(s) and a trainer on 127.0.0.1 "
              f"(demo dir {home}; --fresh starts from scratch)")
        seed, url = start_seed(echo=sys.stdout, home=home)
        children.append(seed)
        for i in range(volunteers):
            # one after another: each sees what the previous ones serve and picks other experts
            child = start_volunteer(home / f"volunteer{i}", url, "--log-interval", "60", echo=sys.stdout,
                                    name=f"volunteer{i}", render=lambda line: human_line(line, width))
            children.append(child)
            child.wait_for_line(r"\"event\": \"serving\"", timeout=180)
        print(f"training through the swarm; Ctrl-C to stop; verified contributions: {url}/v1/leaderboard")
        trainer = start_trainer(url, home / "trainer-key.der", steps, echo=sys.stdout)  # the key the seed trusts
        children.append(trainer)
        return trainer.proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_together(children)
