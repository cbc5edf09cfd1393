"""``volunteer``: a thin command line over the library; it parses, calls one function, maps errors to exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from volunteer import __version__
from volunteer.config.sources import parse_memory  # noqa: F401  (moved; re-exported for old imports)
from volunteer.core.logs import setup_logging

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


def _known_errors() -> tuple[type[BaseException], ...]:
    from hivemind.p2p import P2PDaemonError

    from volunteer.core.procgroup import AlreadyRunning
    from volunteer.core.seed_client import CoordinatorError
    from volunteer.node.control import ControlError
    from volunteer.serving.backends import ServerStartError

    # P2PDaemonError: the DHT could not start (port taken, no bootstrap peer reachable)
    return (ValueError, CoordinatorError, AlreadyRunning, OSError, P2PDaemonError, ControlError, ServerStartError)


def _exit_for(error: BaseException) -> BaseException:
    """A one-line error and exit 2 for bad input; anything else is a bug and keeps its traceback."""
    from volunteer.core.procgroup import unwrap

    error = unwrap(error)
    if isinstance(error, KeyboardInterrupt):
        return typer.Exit(130)
    supervisor = sys.modules.get("volunteer.node.supervisor")  # only a running client raises NodeFailed
    if supervisor is not None and isinstance(error, supervisor.NodeFailed):
        return fail(str(error), code=1)  # not bad input: serving kept breaking; a service manager may retry
    if isinstance(error, _known_errors()):
        return fail(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    return error


@app.command()
def start(
    coordinator: Optional[str] = typer.Option(None, help="Coordinator seed URL. [env: VOLUNTEER_COORDINATOR]"),
    experiment: Optional[Path] = typer.Option(None, help="Experiment manifest file (TOML or JSON)."),
    initial_peers: List[str] = typer.Option([], "--initial-peers", help="DHT multiaddrs to join (with --experiment)."),
    host: Optional[str] = typer.Option(None, help="Address the DHT and expert RPCs listen on. [default: 0.0.0.0]"),
    port: Optional[int] = typer.Option(None, help="TCP port for the DHT and experts. [default: 0 = any free port]"),
    announce_host: Optional[str] = typer.Option(None, help="Public address to announce (port forwarding)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: every GPU, else CPU)."),
    gpus: Optional[str] = typer.Option(None, help="Serve on these GPUs only: indices or UUIDs, e.g. 0,2."),
    max_memory: Optional[str] = typer.Option(None, help="Memory budget on each device: a fraction (0.5) "
                                                        "or a size (8GiB)."),
    max_experts: Optional[int] = typer.Option(None, help="Host at most this many experts."),
    num_handlers: Optional[int] = typer.Option(None, help="Connection handler processes. [default: 2]"),
    checkpoint_interval: Optional[float] = typer.Option(None, help="Seconds between checkpoints. [default: 60]"),
    headless: Optional[bool] = typer.Option(None, "--headless", help="No dashboard: JSON lines on stdout (automatic "
                                                                    "when stdout is not a terminal)."),
    dashboard: Optional[bool] = typer.Option(None, "--dashboard", help="The dashboard even when stdout is no terminal."),
    log_interval: Optional[float] = typer.Option(None, help="Seconds between headless stats lines. [default: 10]"),
    cpu_threads: Optional[int] = typer.Option(None, help="Torch threads for serving."),
    power: Optional[str] = typer.Option(None, help="light, medium or full. [default: full]"),
    max_temp: Optional[float] = typer.Option(None, help="Pause while the GPU is hotter than this (Celsius)."),
    run_hours: Optional[str] = typer.Option(None, help="Serve only in this daily window, e.g. 22-08."),
    pause_on_gpu_use: Optional[bool] = typer.Option(None, "--pause-on-gpu-use/--no-pause-on-gpu-use",
                                                    help="Pause while another process uses the GPU."),
    stats: Optional[bool] = typer.Option(None, "--stats/--no-stats", help="Count samples and time requests."),
    remeasure: Optional[bool] = typer.Option(None, "--remeasure", help="Re-run the throughput micro-benchmark."),
    rebalance_period: Optional[float] = typer.Option(None, help="Mean seconds between rebalancing checks "
                                                                  "(0 = never). [default: 300]"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Join the swarm, serve and train experts until Ctrl-C, SIGTERM, `q` or `volunteer stop`.

    Settings: flags > VOLUNTEER_* environment > volunteer.toml > defaults; see `volunteer config show`.
    """
    from volunteer.config.sources import resolve_settings
    from volunteer.core.logs import EventLog
    from volunteer.core.paths import default_paths
    from volunteer.node.supervisor import run_volunteer

    flags = {
        "coordinator": coordinator, "experiment_file": experiment, "initial_peers": initial_peers or None,
        "host": host, "port": port, "announce_host": announce_host, "device": device, "gpus": gpus,
        "max_memory": max_memory, "max_experts": max_experts, "num_handlers": num_handlers, "checkpoint_interval": checkpoint_interval,
        "headless": headless, "dashboard": dashboard, "log_interval": log_interval, "cpu_threads": cpu_threads,
        "power": power, "max_temp": max_temp, "run_hours": run_hours, "pause_on_gpu_use": pause_on_gpu_use,
        "stats": stats, "remeasure": remeasure, "rebalance_period": rebalance_period,
    }
    try:
        settings = resolve_settings(flags).settings.require_experiment()
    except BaseException as e:
        setup_logging(verbose)
        raise _exit_for(e)
    show_dashboard = settings.show_dashboard(sys.stdout.isatty())
    setup_logging(verbose, json_lines=not show_dashboard)
    try:
        events = EventLog(None if show_dashboard else sys.stdout)
        runner = None
        if show_dashboard:
            from volunteer.views.dashboard import run_dashboard as runner
        run_volunteer(settings, default_paths(), events=events, dashboard=runner)
    except BaseException as e:
        raise _exit_for(e)


def _control_path():
    from volunteer.core.paths import default_paths
    from volunteer.node.control import socket_path

    return socket_path(default_paths().runtime_dir)


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print the full figures as JSON.")) -> None:
    """Print the live figures of the volunteer running on this machine."""
    from volunteer.node import control
    from volunteer.node.stats import StatsSnapshot
    from volunteer.views.monitor import summary_lines

    try:
        figures = control.request(_control_path(), "status")["status"]
        lines = [json.dumps(figures, indent=1)] if as_json else summary_lines(StatsSnapshot.from_dict(figures))
    except (KeyError, TypeError, AttributeError) as e:  # a volunteer of another version
        raise fail(f"the running volunteer answered in a form this version cannot read ({type(e).__name__}: {e})")
    except BaseException as e:
        raise _exit_for(e)
    for line in lines:
        typer.echo(line)


@app.command()
def stop(timeout: float = typer.Option(60.0, help="Seconds to wait for the drain.")) -> None:
    """Ask the running volunteer to drain (finish requests, checkpoint, leave) and wait until it exits."""
    from volunteer.node import control

    try:
        seconds = control.stop(_control_path(), timeout=timeout)
    except BaseException as e:
        raise _exit_for(e)
    typer.echo(f"stopped in {seconds:.1f} s")


@app.command()
def pause() -> None:
    """Pause the running volunteer: it refuses work and hides from trainers, keeping its weights in memory."""
    _pause_or_resume("pause")


@app.command()
def resume() -> None:
    """Resume a paused volunteer (it stays paused while a limit such as --run-hours still holds)."""
    _pause_or_resume("resume")


def _pause_or_resume(command: str) -> None:
    from volunteer.node import control

    try:
        answer = control.request(_control_path(), command)
        reasons = f" ({'; '.join(map(str, answer['reasons']))})" if answer["reasons"] else ""
        typer.echo(f"{answer['state']}{reasons}")
    except (KeyError, TypeError) as e:  # a volunteer of another version
        raise fail(f"the running volunteer answered in a form this version cannot read ({type(e).__name__}: {e})")
    except BaseException as e:
        raise _exit_for(e)


@app.command()
def monitor(refresh: float = typer.Option(1.0, help="Seconds between refreshes.")) -> None:
    """Show the dashboard of a volunteer that is already running (headless, in another terminal); `q` quits."""
    from volunteer.views.monitor import run_monitor

    try:
        run_monitor(_control_path(), refresh)
    except BaseException as e:
        raise _exit_for(e)


@app.command()
def hardware(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    coordinator: Optional[str] = typer.Option(None),
    experiment: Optional[Path] = typer.Option(None, help="Plan for this manifest instead of the default one."),
    device: Optional[str] = typer.Option(None),
    gpus: Optional[str] = typer.Option(None),
    max_memory: Optional[str] = typer.Option(None),
    max_experts: Optional[int] = typer.Option(None),
    measure: bool = typer.Option(False, "--plan", help="Also measure each expert type's throughput here "
                                                      "(cached) and explain the whole decision."),
    remeasure: bool = typer.Option(False, "--remeasure", help="With --plan: measure again, ignoring the cache."),
) -> None:
    """Show the detected hardware and the plan of each device this machine would serve on, without
    joining anything."""
    from dataclasses import replace

    from volunteer.config.sources import resolve_settings
    from volunteer.core.manifest import default_manifest, load
    from volunteer.host.hardware import detect_hardware
    from volunteer.planning.placement import choose_devices, place_experts

    flags = {"coordinator": coordinator, "experiment_file": experiment, "device": device, "gpus": gpus,
             "max_memory": max_memory, "max_experts": max_experts}
    try:
        settings = resolve_settings(flags).settings
        if settings.coordinator:
            from volunteer.core.paths import default_paths
            from volunteer.core.seed_client import fetch_experiment

            manifest = fetch_experiment(settings.coordinator, default_paths().cache_dir).manifest
        else:
            manifest = load(settings.experiment_file) if settings.experiment_file else default_manifest()
        profile = detect_hardware()
        devices, hidden = choose_devices(profile, settings.device, settings.gpus)
        placement = place_experts(profile, manifest, {}, devices=devices, max_memory=settings.max_memory,
                                  max_experts=settings.max_experts)
        placement = replace(placement, left_out=hidden + placement.left_out)
        if measure or remeasure:
            from volunteer.core.paths import default_paths
            from volunteer.planning.sizing import measure_plan

            placement = replace(placement, plans=tuple(
                measure_plan(profile, manifest, plan, default_paths().cache_dir, remeasure=remeasure)
                for plan in placement.plans
            ))
    except BaseException as e:
        raise _exit_for(e)
    if as_json:
        typer.echo(json.dumps(dict(hardware=profile.to_dict(), experiment=manifest.name, **placement.to_dict()),
                              indent=2))
        return
    from volunteer.views.report import print_hardware_and_placement

    print_hardware_and_placement(profile, manifest, placement)


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


config_app = typer.Typer(no_args_is_help=True,
                         help="Settings: flags > VOLUNTEER_* environment > volunteer.toml > defaults.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print the effective settings and where each came from; the config file is only ever read."""
    from volunteer.config.sources import resolve_settings

    try:
        resolved = resolve_settings({})
    except BaseException as e:
        raise _exit_for(e)
    typer.echo(json.dumps(resolved.to_dict(), indent=2) if as_json else resolved.format_table())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
