"""``volunteer``: a thin command line over the library; it parses, calls one function, maps errors to exit codes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from volunteer import __version__
from volunteer.logs import setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lend this machine to a hivemind MoE swarm.")
EXIT_BAD_INPUT = 2


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hivemind-volunteer {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Serve and train Mixture-of-Experts experts for a decentralized training run."""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def parse_memory(text: str | None) -> float | int | None:
    """``0.5`` is a fraction of free memory; ``12GiB``, ``800MB`` or a plain integer are bytes."""
    if text is None:
        return None
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"--max-memory {text!r}: give a fraction like 0.5 or a size like 8GiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit and number <= 1:
        return number
    if not unit and not number.is_integer():
        raise ValueError(f"--max-memory {text!r}: a fraction must be at most 1; sizes need a unit (8GiB)")
    return int(number * units[unit])


def split_peers(peers: List[str]) -> tuple[str, ...]:
    return tuple(p for item in peers for p in re.split(r"[,\s]+", item) if p)


def _known_errors() -> tuple[type[BaseException], ...]:
    from hivemind.p2p import P2PDaemonError

    from volunteer.control import ControlError
    from volunteer.coordinator import CoordinatorError
    from volunteer.procgroup import AlreadyRunning

    # P2PDaemonError: the DHT could not start (port taken, no bootstrap peer reachable)
    return (ValueError, CoordinatorError, AlreadyRunning, OSError, P2PDaemonError, ControlError)


def _exit_for(error: BaseException) -> BaseException:
    """A one-line error and exit 2 for bad input; anything else is a bug and keeps its traceback."""
    from volunteer.procgroup import unwrap

    error = unwrap(error)
    if isinstance(error, KeyboardInterrupt):
        return typer.Exit(130)
    if isinstance(error, _known_errors()):
        return fail(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    return error


@app.command()
def start(
    coordinator: Optional[str] = typer.Option(None, envvar="VOLUNTEER_COORDINATOR", help="Coordinator seed URL."),
    experiment: Optional[Path] = typer.Option(None, help="Experiment manifest file (TOML or JSON)."),
    initial_peers: List[str] = typer.Option([], "--initial-peers", help="DHT multiaddrs to join (with --experiment)."),
    host: str = typer.Option("0.0.0.0", help="Address the DHT and expert RPCs listen on."),
    port: int = typer.Option(0, help="TCP port for the DHT and experts (0 = any free port)."),
    announce_host: Optional[str] = typer.Option(None, help="Public address to announce (port forwarding)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: the best GPU, else CPU)."),
    max_memory: Optional[str] = typer.Option(None, help="Memory budget: a fraction (0.5) or a size (8GiB)."),
    max_experts: Optional[int] = typer.Option(None, help="Host at most this many experts."),
    num_handlers: int = typer.Option(2, help="Connection handler processes."),
    checkpoint_interval: float = typer.Option(60.0, help="Seconds between checkpoints."),
    headless: bool = typer.Option(False, "--headless", help="No dashboard: JSON lines on stdout (automatic "
                                                             "when stdout is not a terminal)."),
    log_interval: float = typer.Option(10.0, help="Seconds between headless stats lines."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Join the swarm, serve and train experts until Ctrl-C, SIGTERM, `q` or `volunteer stop`."""
    from volunteer.logs import EventLog
    from volunteer.paths import default_paths
    from volunteer.settings import Settings
    from volunteer.supervisor import run_volunteer

    headless = headless or not sys.stdout.isatty()
    setup_logging(verbose, json_lines=headless)
    try:
        settings = Settings(
            coordinator=coordinator, experiment_file=experiment, initial_peers=split_peers(initial_peers),
            host=host, port=port, announce_host=announce_host, device=device, max_memory=parse_memory(max_memory),
            max_experts=max_experts, num_handlers=num_handlers, checkpoint_interval=checkpoint_interval,
            headless=headless, log_interval=log_interval,
        )
        events = EventLog(sys.stdout if headless else None)
        run_volunteer(settings, default_paths(), events=events, dashboard=not headless)
    except BaseException as e:
        raise _exit_for(e)


def _control_path():
    from volunteer.control import socket_path
    from volunteer.paths import default_paths

    return socket_path(default_paths().runtime_dir)


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print the full figures as JSON.")) -> None:
    """Print the live figures of the volunteer running on this machine."""
    from volunteer import control
    from volunteer.stats import StatsSnapshot

    try:
        answer = control.request(_control_path(), "status")
    except BaseException as e:
        raise _exit_for(e)
    if as_json:
        typer.echo(json.dumps(answer["status"], indent=1))
        return
    from volunteer.dashboard import summary_lines

    for line in summary_lines(StatsSnapshot.from_dict(answer["status"])):
        typer.echo(line)


@app.command()
def stop(timeout: float = typer.Option(60.0, help="Seconds to wait for the drain.")) -> None:
    """Ask the running volunteer to drain (finish requests, checkpoint, leave) and wait until it exits."""
    from volunteer import control

    try:
        seconds = control.stop(_control_path(), timeout=timeout)
    except BaseException as e:
        raise _exit_for(e)
    typer.echo(f"stopped in {seconds:.1f} s")


@app.command()
def monitor(refresh: float = typer.Option(1.0, help="Seconds between refreshes.")) -> None:
    """Show the dashboard of a volunteer that is already running (headless, in another terminal); `q` quits."""
    from volunteer.dashboard import run_monitor

    try:
        run_monitor(_control_path(), refresh)
    except BaseException as e:
        raise _exit_for(e)


@app.command()
def hardware(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    coordinator: Optional[str] = typer.Option(None, envvar="VOLUNTEER_COORDINATOR"),
    experiment: Optional[Path] = typer.Option(None, help="Plan for this manifest instead of the default one."),
    device: Optional[str] = typer.Option(None),
    max_memory: Optional[str] = typer.Option(None),
    max_experts: Optional[int] = typer.Option(None),
) -> None:
    """Show the detected hardware and the plan this machine would serve, without joining anything."""
    from volunteer.hardware import detect_hardware
    from volunteer.manifest import default_manifest, load
    from volunteer.sizing import plan_experts

    try:
        if coordinator:
            from volunteer.coordinator import fetch_experiment
            from volunteer.paths import default_paths

            manifest = fetch_experiment(coordinator, default_paths().cache_dir).manifest
        else:
            manifest = load(experiment) if experiment else default_manifest()
        profile = detect_hardware()
        plan = plan_experts(profile, manifest, {}, device=device, max_memory=parse_memory(max_memory),
                            max_experts=max_experts)
    except BaseException as e:
        raise _exit_for(e)
    if as_json:
        typer.echo(json.dumps(dict(hardware=profile.to_dict(), experiment=manifest.name, plan=plan.to_dict()), indent=2))
        return
    from volunteer.report import print_hardware_and_plan

    print_hardware_and_plan(profile, manifest, plan)


@app.command()
def demo(
    volunteers: int = typer.Option(1, min=1, max=4, help="Volunteers to start on this machine."),
    steps: Optional[int] = typer.Option(None, help="Trainer steps, then stop (default: until Ctrl-C)."),
) -> None:
    """Run a whole swarm on loopback: a coordinator seed, volunteers and the trainer."""
    from volunteer.demo import run_demo

    setup_logging(False)
    try:
        code = run_demo(volunteers=volunteers, steps=steps)
    except BaseException as e:
        raise _exit_for(e)
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
