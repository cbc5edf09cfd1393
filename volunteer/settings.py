"""The volunteer's settings: one frozen value, built by the CLI and passed down unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    coordinator: str | None = None  # http(s) URL of a coordinator seed
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs, used with experiment_file instead of a coordinator
    experiment_file: Path | None = None
    host: str = "0.0.0.0"  # where the DHT and expert RPCs listen
    port: int = 0  # 0 = any free port
    announce_host: str | None = None  # public address to announce, behind port forwarding
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None = the best GPU, else the CPU
    max_memory: float | int | None = None  # fraction of free memory, or bytes; None = a safe default
    max_experts: int | None = None
    num_handlers: int = 2  # hivemind's default, 8 per expert, costs ~850 MiB for 4 experts (ENGINE-NOTES)
    checkpoint_interval: float = 60.0
    announce_interval: float = 20.0  # how often experts and the volunteer record are re-declared
    headless: bool = False
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        if not self.coordinator and self.experiment_file is None:
            raise ValueError(
                "no experiment configured: pass --coordinator URL, or --experiment FILE with --initial-peers, "
                "or try `volunteer demo` for a local swarm"
            )
        if self.coordinator and self.experiment_file is not None:
            raise ValueError("--coordinator and --experiment are alternatives; pass one")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a TCP port")
        if self.num_handlers < 1 or self.max_experts is not None and self.max_experts < 1:
            raise ValueError("--num-handlers and --max-experts must be at least 1")
        if self.checkpoint_interval <= 0 or self.announce_interval <= 0 or self.log_interval <= 0:
            raise ValueError("intervals must be positive")
