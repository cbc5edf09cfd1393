"""``coordinator-seed``: run the project's side of the swarm (the seed, and the trainer)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import List, Optional

import trio
import typer

from volunteer import __version__
from volunteer.core.logs import setup_logging
from volunteer.core.procgroup import become_supervisor, unwrap

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,  # plain help, as volunteer's
                  help="The project's side of a volunteer swarm.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"coordinator-seed (hivemind-volunteer) {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version.")) -> None:
    """Bootstrap peer, experiment manifest over HTTP, and the trainer."""


def _manifest(experiment: Optional[Path]):
    from volunteer.core.manifest import default_manifest, load

    return load(experiment) if experiment else default_manifest()


async def _until_signal(main, *args) -> None:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives, then let it clean up."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            nursery.start_soon(main, *args)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _fail(e: BaseException) -> typer.Exit:
    e = unwrap(e)
    typer.echo(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", err=True)
    return typer.Exit(2)


def _is_known(e: BaseException, *types: type[BaseException]) -> bool:
    return isinstance(unwrap(e), types)


@app.command()
def run(
    host: str = typer.Option("127.0.0.1", help="Address for HTTP and the DHT."),
    http_port: int = typer.Option(8470, help="HTTP port for /v1/experiment, /v1/peers, /healthz."),
    dht_port: int = typer.Option(0, help="DHT port (fix it in production so peer addresses stay valid)."),
    experiment: Optional[Path] = typer.Option(None, help="Manifest file (default: the shipped experiment)."),
    identity: Optional[Path] = typer.Option(None, help="Identity key file (default: in the data dir)."),
    announce_host: Optional[str] = typer.Option(None, help="Public address to announce."),
    data_dir: Optional[Path] = typer.Option(None, help="Identity, trusted trainer key and leaderboard "
                                                       "(default: the platform's data dir)."),
    trainer_key: Optional[Path] = typer.Option(None, help="The trainer key whose contributions count "
                                                          "(default: trainer-key.der in the data dir)."),
    leaderboard_period: float = typer.Option(10.0, help="Seconds between reads of the trainers' records."),
) -> None:
    """Run the seed: a stable DHT peer serving the experiment and its peers over HTTP."""
    from coordinator_seeds.seed import SeedError, SeedSettings, run_seed
    from volunteer.core.manifest import ManifestError

    setup_logging(verbose=False)
    try:
        settings = SeedSettings(_manifest(experiment), host=host, http_port=http_port, dht_port=dht_port,
                                identity_path=identity, announce_host=announce_host, data_dir=data_dir,
                                trainer_key_path=trainer_key, leaderboard_period=leaderboard_period)
        become_supervisor()
        trio.run(_until_signal, run_seed, settings)
    except BaseException as e:
        if _is_known(e, SeedError, ManifestError, OSError):
            raise _fail(e)
        raise


@app.command()
def train(
    coordinator: Optional[str] = typer.Option(None, help="Coordinator seed URL."),
    experiment: Optional[Path] = typer.Option(None, help="Manifest file, with --initial-peers."),
    initial_peers: List[str] = typer.Option([], "--initial-peers", help="DHT multiaddrs to join, with "
                                                                        "--experiment (repeat or comma-separate)."),
    steps: Optional[int] = typer.Option(None, help="Stop after this many steps."),
    log_every: int = typer.Option(10, help="Log the loss and publish progress every this many steps."),
    idle_wait: float = typer.Option(30.0, help="With no expert alive at a log step, seconds to wait for volunteers "
                                               "before stepping on (0: never wait)."),
    in_flight: int = typer.Option(4, min=1, max=64, help="Micro-batches trained at once, each with its own forward "
                                                         "and backward (delayed updates): hides WAN round trips; "
                                                         "1 = one synchronous step at a time."),
    host: str = typer.Option("127.0.0.1", help="Address its p2p daemon listens on; a public one (or 0.0.0.0) "
                                               "lets volunteers behind NAT routers dial in and be called."),
    key: Optional[Path] = typer.Option(None, help="Key that signs the contributions it publishes (default: "
                                                  "trainer-key.der in the coordinator's data dir, the one "
                                                  "a seed on this machine trusts)."),
    audit_rate: float = typer.Option(0.02, help="Share of expert calls audited (commit, then reveal); 0 turns "
                                                "audits off, and then no server earns credit."),
) -> None:
    """Train the experiment's model through the swarm's experts, logging the loss."""
    if not 0.0 <= audit_rate <= 1.0:  # before the heavy imports: a typo answers at once
        raise _fail(ValueError(f"--audit-rate must be between 0 and 1, got {audit_rate}"))
    from coordinator_seeds.trainer import TrainerSettings, untrusted_key_warning
    from coordinator_seeds.trainer import train as run_training
    from volunteer.core.manifest import ManifestError
    from volunteer.core.paths import default_paths
    from volunteer.core.seed_client import CoordinatorError, fetch_experiment

    setup_logging(verbose=False)
    try:
        if coordinator:
            found = fetch_experiment(coordinator, default_paths("hivemind-coordinator").cache_dir)
            manifest, peers = found.manifest, found.initial_peers
        else:
            manifest, peers = _manifest(experiment), tuple(initial_peers)
            if not peers:
                raise ValueError("pass --coordinator URL, or --initial-peers with --experiment")
        become_supervisor()
        from coordinator_seeds.seed import TRAINER_KEY

        key_path = key or default_paths("hivemind-coordinator").data_dir / TRAINER_KEY
        if coordinator and (warning := untrusted_key_warning(coordinator, key_path)):
            typer.echo(f"warning: {warning}", err=True)
        from coordinator_seeds.audit import AuditSettings

        run_training(TrainerSettings(manifest, tuple(peers), steps=steps, log_every=log_every, idle_wait=idle_wait,
                                     key_path=key_path, host=host, audit=AuditSettings(rate=audit_rate),
                                     in_flight=in_flight))
    except (CoordinatorError, ManifestError, ValueError, OSError) as e:
        raise _fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(130)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
