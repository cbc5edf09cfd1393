"""``volunteer``: a thin command line over the library; it parses, calls one function, maps errors to exit codes."""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from typing import Any, Optional

import typer
import typer.core

from volunteer import __version__
from volunteer.config.settings import KEYS, Key
from volunteer.core.logs import setup_logging

# rich_markup_mode=None: click's plain help, whose option names never get cut at 80 columns and whose
# flags read `--version`, not `--version <bool>` (typer's rich layout)
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Lend this machine to a hivemind MoE swarm.")
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
    from volunteer.core.procgroup import AlreadyRunning
    from volunteer.core.seed_client import CoordinatorError
    from volunteer.node.control import ControlError

    known: list[type[BaseException]] = [ValueError, CoordinatorError, AlreadyRunning, OSError, ControlError]
    # P2PDaemonError: the DHT could not start (port taken, no bootstrap peer reachable). These two come
    # from modules that load torch and hivemind (seconds): an error of a class never imported cannot
    # have been raised, so `volunteer status` with nothing running does not pay for them.
    for module, name in (("hivemind.p2p", "P2PDaemonError"), ("volunteer.serving.backends", "ServerStartError")):
        if (loaded := sys.modules.get(module)) is not None:
            known.append(getattr(loaded, name))
    return tuple(known)


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


def _setting_option(key: Key) -> inspect.Parameter:
    """A ``start`` option for one row of the settings table, with the setting's own default for --help."""
    unset = key.unset != "none" and key.unset  # "(auto)" says something, "(none)" does not
    option = typer.Option(key.default, "/".join(key.flags), help=key.help,
                          show_default=unset if key.default is None else True)
    return inspect.Parameter(key.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[key.kind.flag_type])


def _with_setting_options(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Typer reads a command's options from its signature: put one option per setting (those ``names``,
    or every one) before the command's own."""
    keys = [key for key in KEYS if not names or key.name in names]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        command.__signature__ = signature.replace(parameters=[*map(_setting_option, keys), *own])
        return command

    return decorate


def _given_flags(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    """Only the flags on the command line: a default shown in --help must not hide the environment or file."""
    # click's ParameterSource, by name: typer bundles click privately, so its enum is not ours to import
    return {name: value for name, value in options.items() if ctx.get_parameter_source(name).name == "COMMANDLINE"}


class _ClickHelp(typer.core.TyperCommand):
    """Click's help layout: rich's option table cuts names like --checkpoint-interval at 80 columns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = None


@app.command(cls=_ClickHelp)
@_with_setting_options()
def start(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at debug level, hivemind's records included."),
    **options: Any,
) -> None:
    """Join the swarm, serve and train experts until Ctrl-C, SIGTERM, `q` or `volunteer stop`.

    Settings: flags > VOLUNTEER_* environment > volunteer.toml > defaults; see `volunteer config show`.
    """
    from volunteer.config.sources import resolve_settings
    from volunteer.core.logs import EventLog
    from volunteer.core.paths import default_paths
    from volunteer.node.supervisor import run_volunteer

    try:
        settings = resolve_settings(_given_flags(ctx, options)).settings.require_experiment()
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
        if show_dashboard and events.closing:  # the dashboard's screen is gone: say how it ended
            typer.echo(events.closing)
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


@app.command(cls=_ClickHelp)
@_with_setting_options("coordinator", "experiment_file", "device", "gpus", "max_memory", "max_experts")
def hardware(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    measure: bool = typer.Option(False, "--plan", help="Also measure each expert type's throughput here "
                                                      "(cached) and explain the whole decision."),
    remeasure: bool = typer.Option(False, "--remeasure", help="With --plan: measure again, ignoring the cache."),
    **options: Any,
) -> None:
    """Show the detected hardware and the plan of each device this machine would serve on, without
    joining anything."""
    from volunteer.config.sources import resolve_settings
    from volunteer.core.manifest import default_manifest, load
    from volunteer.core.paths import default_paths
    from volunteer.host.hardware import detect_hardware
    from volunteer.planning.devices import serving_devices
    from volunteer.planning.placement import Measuring, plan_volunteer

    try:
        settings = resolve_settings(_given_flags(ctx, options)).settings
        if settings.coordinator:
            from volunteer.core.seed_client import fetch_experiment

            manifest = fetch_experiment(settings.coordinator, default_paths().cache_dir).manifest
        else:
            manifest = load(settings.experiment_file) if settings.experiment_file else default_manifest()
        profile = detect_hardware()
        measuring = Measuring(default_paths().cache_dir, remeasure) if measure or remeasure else None
        # what a node would serve here, before it joins: the swarm is unknown, so empty
        placement = plan_volunteer(profile, manifest, serving_devices(profile, settings.device, settings.gpus),
                                   max_memory=settings.max_memory, max_experts=settings.max_experts,
                                   measuring=measuring, task_pools=settings.serving == "hivemind")
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
    fresh: bool = typer.Option(False, "--fresh", help="Delete the demo's folder first (identities, "
                                                      "checkpoints, leaderboard): a new swarm."),
) -> None:
    """Run a whole swarm on loopback: a coordinator seed, volunteers and the trainer."""
    from volunteer.demo import run_demo

    setup_logging(False)
    try:
        code = run_demo(volunteers=volunteers, steps=steps, fresh=fresh)
    except BaseException as e:
        raise _exit_for(e)
    raise typer.Exit(code)


config_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
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
