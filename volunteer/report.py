"""Human-readable output of ``volunteer hardware``: what was found and what this machine would serve."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from volunteer.hardware import HardwareProfile
from volunteer.manifest import Manifest
from volunteer.sizing import Plan

GiB = 2**30


def print_hardware_and_plan(profile: HardwareProfile, manifest: Manifest, plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    hw = Table(title="Hardware", show_header=True)
    for column in ("device", "name", "memory free / total", "detail"):
        hw.add_column(column)
    for gpu in profile.gpus:
        detail = ", ".join(
            text for text in (
                f"{gpu.utilization:.0f}% busy" if gpu.utilization is not None else "",
                f"{gpu.temperature:.0f}°C" if gpu.temperature is not None else "",
                f"{gpu.power_watts:.0f} W" if gpu.power_watts is not None else "",
            ) if text
        )
        hw.add_row(f"cuda:{gpu.index}", gpu.name, f"{gpu.memory_free / GiB:.1f} / {gpu.memory_total / GiB:.1f} GiB", detail)
    cpu = profile.cpu
    hw.add_row("cpu", cpu.model or "CPU", f"{cpu.memory_available / GiB:.1f} / {cpu.memory_total / GiB:.1f} GiB",
               f"{cpu.cores} cores")
    console.print(hw)
    if profile.nvml_error:
        console.print(f"[dim]no GPU: {profile.nvml_error}[/dim]")
    console.print(
        f"\nPlan for [bold]{manifest.name}[/bold] on [bold]{plan.device}[/bold]: {len(plan.uids)} experts, "
        f"max batch {plan.max_batch_size}, {plan.planned_bytes / GiB:.2f} of {plan.budget_bytes / GiB:.2f} GiB budget"
    )
    for reason in plan.reasons:
        console.print(f"  - {reason}")
    console.print("  uids: " + " ".join(plan.uids))
