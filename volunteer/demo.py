"""``volunteer demo``: a whole swarm on loopback, so one command on one box shows real training.

It starts a coordinator seed, one or more ``volunteer start`` processes (each with its own home under
the demo dir) and the seed's trainer, each as a process of its own, and prints their lines prefixed
with their names while the trainer's loss falls.
"""

from __future__ import annotations

import sys

from volunteer.core.harness import (
    ChildProcess,
    start_seed,
    start_trainer,
    start_volunteer,
)
from volunteer.core.paths import default_paths
from volunteer.core.procgroup import become_supervisor


def run_demo(volunteers: int = 1, steps: int | None = None) -> int:
    become_supervisor()
    home = default_paths().data_dir / "demo"
    children: list[ChildProcess] = []
    try:
        print(f"starting a coordinator seed, {volunteers} volunteer(s) and a trainer on 127.0.0.1 (demo dir {home})")
        seed, url = start_seed(echo=sys.stdout, home=home)
        children.append(seed)
        for i in range(volunteers):
            # one after another: each sees what the previous ones serve and picks other experts
            child = start_volunteer(home / f"volunteer{i}", url, "--log-interval", "60", echo=sys.stdout,
                                    name=f"volunteer{i}")
            children.append(child)
            child.wait_for_line(r"\"event\": \"serving\"", timeout=180)
        print(f"training through the swarm; Ctrl-C to stop; verified contributions: {url}/v1/leaderboard")
        trainer = start_trainer(url, home / "trainer-key.der", steps, echo=sys.stdout)  # the key the seed trusts
        children.append(trainer)
        return trainer.proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        for child in reversed(children):
            child.stop()
