"""Check detection, the memory plan and the throughput benchmark on a real NVIDIA GPU.

    .venv/bin/python tests/gpu_check.py [--device cuda:N] [--time-budget S] [--cpu]

Not a pytest module (no ``test_`` prefix): CI and development boxes have no GPU. On a GPU box it

1. prints what NVML gave ``detect_hardware`` next to ``nvidia-smi --query-gpu=...`` and compares them
   (index, UUID, name and total memory must agree; live figures may drift between the two reads);
2. plans the default manifest, builds every planned expert on the GPU, runs a training step
   (forward, hivemind's recomputing backward, optimizer) at the planned max batch on each, and puts
   ``torch.cuda.max_memory_allocated`` next to the planned bytes;
3. runs the throughput micro-benchmark (fresh, not cached) and prints it with the GPU's name;
4. starts a real volunteer node on loopback on every GPU (one plan and one hivemind Runtime thread
   each), sends each GPU's experts forward and backward calls at their planned max batch from a
   plain hivemind client, and puts each GPU's ``torch.cuda.max_memory_allocated`` next to its plan;
   then restarts the node and trains each GPU's restored experts again (weights and optimizer state
   must come back onto their GPU);
5. prints everything as one JSON object on the last line.

Exit status: 0 when every check passed, or when there is no GPU to check (said on stdout); 1 when a
check failed. ``--cpu`` runs steps 2-4 on the CPU, to try this script where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # as the volunteer does: torch numbers GPUs as NVML

SMI_FIELDS = ("index", "uuid", "name", "memory.total", "memory.used", "utilization.gpu", "temperature.gpu",
              "power.draw")
MiB = 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda:N (NVML index) to plan for; default: the best GPU")
    parser.add_argument("--time-budget", type=float, default=1.5, help="seconds of benchmark per expert type")
    parser.add_argument("--cpu", action="store_true", help="plan, step and benchmark on the CPU instead")
    args = parser.parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hivemind's import-time deprecation noise
        from volunteer.host.hardware import (
            detect_hardware,
            match_torch_devices,
            torch_uuid,
        )

    profile = detect_hardware()
    report: dict[str, Any] = {"driver_version": profile.driver_version, "cuda_driver_version": profile.cuda_driver_version}
    failures: list[str] = []
    if not profile.gpus and not args.cpu:
        print(f"no NVIDIA GPU to check here: {profile.nvml_error}. Nothing was run; exiting 0.")
        print(json.dumps({"skipped": profile.nvml_error}))
        return 0
    if profile.gpus:
        report["gpus"] = compare_with_nvidia_smi(profile, failures)
        report["torch_devices"] = match_torch_devices(profile)
        print(f"\ntorch index of each NVML GPU, matched by UUID: {report['torch_devices'] or 'none'}")
        if not report["torch_devices"] and not args.cpu:
            import torch

            if torch.cuda.is_available():  # torch has GPUs, yet no UUID matched: the matching is wrong
                theirs = [torch_uuid(torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count())]
                failures.append(f"no torch GPU matched by UUID: torch says {theirs}, "
                                f"NVML says {[g.uuid for g in profile.gpus]}")
                print(f"\nFAILED: {failures[-1]}")
                print(json.dumps({**report, "failures": failures}))
                return 1
            print(f"torch {torch.__version__} cannot use these GPUs (a CPU-only build?); nothing more to check. "
                  "Exiting 0.")
            print(json.dumps(report))
            return 0
    report.update(check_plan_and_throughput(profile, "cpu" if args.cpu else args.device, args.time_budget, failures))
    report["serving"] = check_serving("cpu" if args.cpu else args.device, failures)
    report["failures"] = failures
    print("\nFAILED: " + "; ".join(failures) if failures else "\nall checks passed")
    print(json.dumps(report))
    return 1 if failures else 0


# --- NVML against nvidia-smi ---------------------------------------------------------------------


def compare_with_nvidia_smi(profile, failures: list[str]) -> list[dict[str, Any]]:
    smi = read_nvidia_smi()
    if smi is None:
        print("nvidia-smi is not on PATH: NVML figures only")
    rows = []
    print(f"\nNVIDIA driver {profile.driver_version}, CUDA {profile.cuda_driver_version} (NVML)")
    for gpu in profile.gpus:
        ours = {
            "index": gpu.index, "uuid": gpu.uuid, "name": gpu.name, "memory.total": gpu.memory_total / MiB,
            "memory.used": (gpu.memory_total - gpu.memory_free) / MiB, "utilization.gpu": gpu.utilization,
            "temperature.gpu": gpu.temperature, "power.draw": gpu.power_watts,
        }
        theirs = (smi or {}).get(gpu.index, {})
        print(f"\ncuda:{gpu.index} {gpu.name} (compute capability {gpu.compute_capability}, "
              f"{len(gpu.processes)} other processes)")
        print(f"  {'field':<16} {'NVML':>42} {'nvidia-smi':>42}  verdict")
        fields = []
        for field in SMI_FIELDS:
            verdict = judge(field, ours[field], theirs.get(field), gpu.memory_total / MiB) if theirs else "no smi"
            print(f"  {field:<16} {fmt(ours[field]):>42} {fmt(theirs.get(field)):>42}  {verdict}")
            if verdict == "MISMATCH":
                failures.append(f"cuda:{gpu.index} {field}: NVML {fmt(ours[field])} vs nvidia-smi "
                                f"{fmt(theirs.get(field))}")
            fields.append({"field": field, "nvml": ours[field], "nvidia_smi": theirs.get(field), "verdict": verdict})
        rows.append({"index": gpu.index, "fields": fields, "processes": [p.to_dict() for p in gpu.processes]})
    return rows


def read_nvidia_smi() -> dict[int, dict[str, Any]] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    rows = {}
    for line in out.strip().splitlines():
        values = dict(zip(SMI_FIELDS, (v.strip() for v in line.split(","))))
        rows[int(values["index"])] = {k: number(v) if k not in ("uuid", "name") else v for k, v in values.items()}
    return rows


def judge(field: str, ours: Any, theirs: Any, total_mib: float) -> str:
    """Identity must match; live figures were read at different instants and only need to be close."""
    if ours is None or theirs is None:
        return "n/a" if ours is None and theirs is None else "one side missing"
    if field in ("index", "uuid", "name"):
        return "ok" if ours == theirs else "MISMATCH"
    if field == "memory.total":
        return "ok" if abs(ours - theirs) <= 1 else "MISMATCH"  # nvidia-smi rounds to MiB
    # newer drivers leave reserved memory out of nvidia-smi's "used": allow a few percent
    tolerance = {"memory.used": max(512, 0.05 * total_mib), "utilization.gpu": 30, "temperature.gpu": 5,
                 "power.draw": max(30.0, 0.3 * theirs)}[field]
    return "ok" if abs(ours - theirs) <= tolerance else "drifted (live value)"


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


# --- the plan, on the device ---------------------------------------------------------------------


def check_plan_and_throughput(profile, device: str | None, time_budget: float, failures: list[str]) -> dict[str, Any]:
    import torch

    from volunteer.core.manifest import default_manifest
    from volunteer.planning.choice import measure_plan, plan_experts
    from volunteer.planning.devices import torch_device
    from volunteer.planning.memory import PlanCheck
    from volunteer.planning.throughput import _train_step, measured_peak
    from volunteer.serving.experts import build_expert, build_optimizer, sample_input

    manifest = default_manifest()
    plan = plan_experts(profile, manifest, {}, device=device)
    target = torch_device(profile, plan.device)
    print(f"\nplan for {manifest.name} on {plan.device} (torch {target}): {len(plan.uids)} experts at max batch "
          f"{plan.max_batch_size}, {plan.planned_bytes / MiB:.0f} MiB planned of {plan.budget_bytes / MiB:.0f} MiB")
    if target.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(target)
    experts = []
    for uid, type_name in zip(plan.uids, plan.expert_types):
        expert_type = manifest.expert_type(type_name)
        module = build_expert(expert_type.block, manifest.d_model, expert_type.d_hidden, seed=0).to(target)
        experts.append((uid, module, build_optimizer(manifest.optimizer.name, module.parameters(), lr=1e-6)))
    # hivemind's Runtime runs one batch at a time over all the experts it serves: do the same, twice
    # (the first step also allocates the optimizer state)
    for _ in range(2):
        for uid, module, opt in experts:
            x = torch.randn_like(sample_input(manifest.expert_type_of(uid).block, plan.max_batch_size,
                                              manifest.d_model), device=target)
            _train_step(module, opt, x)
    if target.startswith("cuda"):
        torch.cuda.synchronize(target)
    check = PlanCheck.of(plan, measured_peak(target))
    print(f"measured peak {check.measured_bytes / MiB:.1f} MiB vs planned {check.planned_bytes / MiB:.1f} MiB: "
          f"ratio {check.ratio:.3f} ({check.basis}); whole plan {plan.planned_bytes / MiB:.0f} MiB incl. reserves")
    if check.measured_bytes > check.planned_bytes:
        failures.append(f"measured {check.measured_bytes} bytes > planned {check.planned_bytes} ({check.basis})")
    if not check.within_budget:
        failures.append(f"measured {check.measured_bytes} bytes > budget {plan.budget_bytes}")
    process = own_gpu_memory(profile, plan.device)
    if process is not None:  # the CUDA context and allocator cache too: what the reserves stand for
        print(f"this process holds {process / MiB:.0f} MiB on {plan.device} per NVML; "
              f"the plan allows {plan.planned_bytes / MiB:.0f} MiB")
    del experts
    with tempfile.TemporaryDirectory() as cache:
        measured = measure_plan(profile, manifest, plan, Path(cache), remeasure=True, time_budget=time_budget)
    for t in measured.throughput:
        rates = ", ".join(f"{b}: {r:,.0f}" for b, r in sorted(t.by_batch.items()))
        print(f"throughput on {t.device}: {t.expert_type} {t.samples_per_second:,.0f} samples/s at batch "
              f"{t.best_batch_size} (by batch {rates})")
    return {"device_name": measured.throughput[0].device if measured.throughput else None,
            "torch": torch.__version__, "plan": measured.to_dict(), "check": check.to_dict(),
            "process_gpu_bytes": process, "throughput": [t.to_dict() for t in measured.throughput]}


# --- a node serving on every GPU ------------------------------------------------------------------


def check_serving(device: str | None, failures: list[str], calls: int = 3) -> dict[str, Any]:
    import torch
    from hivemind.moe import get_experts

    from coordinator_seeds.dispatch import shutdown_dht
    from volunteer.config.settings import Settings
    from volunteer.core import records
    from volunteer.core.manifest import default_manifest
    from volunteer.core.paths import HOME_ENV, default_paths
    from volunteer.core.seed_client import Experiment
    from volunteer.node.node import VolunteerNode

    manifest = default_manifest()
    home = tempfile.mkdtemp(prefix="gpu-check-")
    os.environ[HOME_ENV] = home  # identity, checkpoints and caches of this check only
    boot = records.join_dht(manifest.dht_prefix, host="127.0.0.1")
    experiment = Experiment(manifest, tuple(records.visible_maddrs(boot)), "file")
    node = VolunteerNode(Settings(host="127.0.0.1", device=device, rebalance_period=0), default_paths().ensure(),
                         experiment)
    client = None
    try:
        info = node.start()
        print(f"\n{info.serving_line()}")
        for note in info.placement.left_out:
            print(f"  {note}")
        client = records.join_dht(manifest.dht_prefix, experiment.initial_peers, host="127.0.0.1", client_mode=True)
        for plan in info.placement.plans:
            for uid in plan.uids:
                [expert] = get_experts(client, [uid])
                if expert is None:
                    failures.append(f"{uid} on {plan.device} is not in the DHT")
                    continue
                for _ in range(calls):
                    x = torch.randn(plan.max_batch_size, manifest.d_model, requires_grad=True)
                    expert(x).sum().backward()
        counted = {e.stats.uid: e.stats.backward_samples for e in node.collector.snapshot().experts}
        short = [uid for uid in info.uids if counted.get(uid, 0) < calls]
        if short:
            failures.append(f"served experts that did not count {calls} backward calls: {short}")
        checks = node.check_plans()
        for check in checks:
            print(f"served on {check.device}: peak {check.measured_bytes / MiB:.1f} MiB vs planned "
                  f"{check.planned_bytes / MiB:.1f} MiB (ratio {check.ratio:.3f})")
            if check.measured_bytes > check.planned_bytes:
                failures.append(f"serving on {check.device}: measured {check.measured_bytes} bytes > planned "
                                f"{check.planned_bytes}")
        # a restart restores weights and optimizer state onto each GPU; a backward step then uses both
        node.shutdown()
        node = VolunteerNode(node.settings, node.paths, experiment)
        again = node.start()
        if sorted(again.restored) != sorted(info.uids):
            failures.append(f"the restart restored {len(again.restored)} of {len(info.uids)} experts")
        for plan in again.placement.plans:
            [expert] = get_experts(client, [plan.uids[0]])
            try:
                expert(torch.randn(4, manifest.d_model, requires_grad=True)).sum().backward()
            except Exception as e:
                failures.append(f"after the restart, {plan.uids[0]} on {plan.device} failed: {type(e).__name__}: {e}")
        print(f"restarted: {again.serving_line()}")
        return {**info.placement.to_dict(), "checks": [c.to_dict() for c in checks]}
    finally:
        if client is not None:
            shutdown_dht(client)
        node.shutdown()
        shutdown_dht(boot)
        shutil.rmtree(home, ignore_errors=True)


def own_gpu_memory(profile, device) -> int | None:
    """This process's memory on the plan's GPU (a ``Device``) as the driver counts it; None where NVML
    cannot say (containers)."""
    if not device.is_gpu:
        return None
    from volunteer.host.hardware import gpu_telemetry

    gpu = next((g for g in gpu_telemetry() if g.index == device.index), None)
    mine = [p.used_memory for p in (gpu.processes if gpu else ()) if p.pid == os.getpid()]
    return mine[0] if mine and mine[0] is not None else None


if __name__ == "__main__":
    sys.exit(main())
