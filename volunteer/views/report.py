"""Human-readable output of ``volunteer hardware``: what was found and what this machine would serve.

Renderers take the console as an argument, so tests print into ``Console(file=StringIO(), width=...)``.
The JSON twin of this output is ``HardwareProfile.to_dict`` and ``Plan.to_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from volunteer.core.manifest import Manifest
from volunteer.host.hardware import GPUInfo, HardwareProfile
from volunteer.planning.choice import Plan
from volunteer.planning.devices import Device
from volunteer.planning.memory import PlanCheck
from volunteer.planning.placement import Placement

GiB = 2**30


def print_hardware_and_placement(
    profile: HardwareProfile, manifest: Manifest, placement: Placement, console: Console | None = None,
    checks: Sequence[PlanCheck] = (),
) -> None:
    """The hardware table, then each device's plan: budget, cost per expert type, throughput, uids and
    reasons; then the devices left out and why."""
    console = console or Console()
    print_hardware(profile, console)
    check_of = {check.device: check for check in checks}
    for plan in placement.plans:
        print_plan(manifest, plan, console, check_of.get(plan.device))
    for note in placement.left_out:
        console.print(f"\n{note}")


def print_hardware(profile: HardwareProfile, console: Console) -> None:
    hw = Table(title="Hardware", show_header=True)
    for column in ("device", "name", "memory free / total", "detail"):
        hw.add_column(column)
    for gpu in profile.gpus:
        hw.add_row(str(Device.gpu(gpu)), gpu.name, f"{_gib(gpu.memory_free)} / {_gib(gpu.memory_total)} GiB",
                   _gpu_detail(gpu))
    cpu = profile.cpu
    hw.add_row("cpu", cpu.model or "CPU", f"{_gib(cpu.memory_available)} / {_gib(cpu.memory_total)} GiB",
               f"{cpu.cores} cores")
    console.print(hw)
    if profile.driver_version or profile.cuda_driver_version:
        console.print(f"NVIDIA driver {profile.driver_version or '?'}, CUDA {profile.cuda_driver_version or '?'}")
    for gpu in profile.gpus:
        if gpu.processes:  # memory someone else holds can vanish or grow: worth saying who
            others = ", ".join(
                f"{p.name or 'pid'} ({p.pid}{', ' + _size(p.used_memory) if p.used_memory is not None else ''})"
                for p in gpu.processes
            )
            console.print(f"{Device.gpu(gpu)} is shared with {_count(len(gpu.processes), 'process')}: {others}")
    if profile.nvml_error:
        console.print(f"[dim]no GPU: {profile.nvml_error}[/dim]")


def print_plan(manifest: Manifest, plan: Plan, console: Console, check: PlanCheck | None = None) -> None:
    console.print(
        f"\nPlan for [bold]{manifest.name}[/bold] on [bold]{plan.device}[/bold]: {len(plan.uids)} experts, "
        f"max batch {plan.max_batch_size}, {plan.planned_bytes / GiB:.2f} of {plan.budget_bytes / GiB:.2f} GiB budget"
    )
    if plan.costs:
        console.print(cost_table(manifest, plan))
    for reason in plan.reasons:
        console.print(f"  - {reason}")
    console.print("  uids: " + " ".join(plan.uids))
    if check is not None:
        verdict = "within budget" if check.within_budget else "[bold red]OVER BUDGET[/bold red]"
        console.print(f"  measured {_size(check.measured_bytes)} vs planned {_size(check.planned_bytes)} "
                      f"(x{check.ratio:.2f}, {check.basis}): {verdict}")


def cost_table(manifest: Manifest, plan: Plan) -> Table:
    """One row per expert type: what one expert costs at the plan's batch, how many were chosen, how fast."""
    title = f"Cost of one expert at batch {plan.max_batch_size} in {plan.dtype} (state: weights, grads, optimizer)"
    table = Table(title=title, show_header=True)
    for column in ("type", "block", "params", "state", "activations", "overhead", "each", "chosen",
                   "samples/s (batch)"):
        table.add_column(column, justify="left" if column in ("type", "block") else "right")
    measured = {t.expert_type: t for t in plan.throughput}
    for cost in plan.costs:
        expert_type = manifest.expert_type(cost.expert_type)
        rate = measured.get(cost.expert_type)
        table.add_row(
            cost.expert_type, f"{expert_type.block} {expert_type.d_hidden}", f"{cost.params:,}",
            _size(cost.weights + cost.grads + cost.optimizer), _size(cost.activations), _size(cost.overhead),
            _size(cost.total), str(plan.expert_types.count(cost.expert_type)),
            f"{rate.samples_per_second:,.0f} ({rate.best_batch_size})" if rate else "not measured",
        )
    return table


def _gpu_detail(gpu: GPUInfo) -> str:
    return ", ".join(
        text for text in (
            f"sm {gpu.compute_capability[0]}.{gpu.compute_capability[1]}" if gpu.compute_capability else "",
            f"{gpu.utilization:.0f}% busy" if gpu.utilization is not None else "",
            f"{gpu.temperature:.0f}°C" if gpu.temperature is not None else "",
            f"{gpu.power_watts:.0f} W" if gpu.power_watts is not None else "",
            _count(len(gpu.processes), "process") if gpu.processes else "",
        ) if text
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def _size(n: int) -> str:
    """Human bytes: 41 MiB, 3.2 GiB, 12 KiB."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}" if unit == "GiB" else f"{n / size:.0f} {unit}"
    return f"{n / 2**10:.0f} KiB"
