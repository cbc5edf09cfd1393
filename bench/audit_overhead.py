"""Audits on and off, side by side: trainer steps/s through one MoE layer of signed replicas, and the
audit's memory per expert on the server.

Two ``volunteer start`` processes serve the 8 experts of one layer (4 each, on the lean path, the
default; every answer carries its commitment, the versions are kept, the reveal service runs). In this
process two layers over the same experts (``replicated_moe``, as the trainer builds them) alternate
rounds: one with an ``Auditor`` at ``--rate`` (its checks run on their own thread, as in the trainer),
one without. Both call the audited handlers, so the difference is the audits' own cost (reveals and
recomputation); the per-round ratios give the spread. Each step is a
forward and a backward of ``--tokens`` samples. The memory figure is the server's ``VersionStore``
for one bench expert after more steps than it keeps: ``keep`` copies of weights and Adam state, plus
the batches of the steps that made them (measured here in-process on the same expert).

    .venv/bin/python -m bench.audit_overhead [--tokens 256] [--rounds 3] [--rate 0.02]
"""

from __future__ import annotations

from functools import partial

import torch

from bench._common import (
    BenchExperiment,
    Swarm,
    alternate,
    bench_args,
    machine_line,
    measure,
    median,
    paired_ratio,
    print_key,
    print_table,
)
from bench.trainer_dispatch import moe_step
from coordinator_seeds.audit import Auditor, AuditSettings
from coordinator_seeds.replicas import replicated_moe
from coordinator_seeds.strangers import expert_specs
from volunteer.core.expert_modules import build_expert, build_optimizer
from volunteer.core.records import join_dht
from volunteer.serving.versions import VersionStore, version_bytes, versions_to_keep

TIMEOUT = 30.0


def version_memory(exp: BenchExperiment, tokens: int) -> tuple[int, int, int]:
    """(bytes the VersionStore of one expert holds when full, bytes of the expert's weights, versions kept)."""
    module = build_expert(exp.block, exp.d_model, exp.d_hidden, seed=0)
    optimizer = build_optimizer("adam", module.parameters(), lr=exp.lr)
    params = sum(p.numel() for p in module.parameters())
    keep = versions_to_keep(version_bytes(params, 2, tokens, exp.d_model))  # as AuditedBackend decides
    store = VersionStore(keep=keep)
    for _ in range(keep + 4):
        before = store.current(module, optimizer)
        x, g = torch.randn(tokens, exp.d_model), torch.randn(tokens, exp.d_model)
        module(x).backward(g)
        optimizer.step()
        optimizer.zero_grad()
        store.advance(module, optimizer, before, x, g)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    return store.memory_bytes(), weights, keep


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], seconds=4.0)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.02)
    args = parser.parse_args()
    exp = BenchExperiment()
    manifest = exp.manifest()
    layer = manifest.layers[0]
    print(machine_line())
    print(f"expert: {exp.describe()}; 2 volunteers x 4 experts; k=2; {args.tokens} tokens a step; "
          f"audit rate {args.rate:.0%}")
    with Swarm(exp, keep=args.keep) as swarm:
        for name in ("volunteer-a", "volunteer-b"):
            swarm.wait_serving(swarm.start_volunteer(name, max_experts=4))
        # the experiment's validators: a plain hivemind DHT hangs reading signed records (ENGINE-NOTES)
        client = swarm._track(join_dht(manifest.dht_prefix, swarm.initial_peers, client_mode=True))
        auditor = Auditor(expert_specs(manifest), AuditSettings(rate=args.rate))
        torch.manual_seed(0)
        layers = {name: replicated_moe(exp.d_model, layer, client, manifest.dht_prefix, k_best=2,
                                       forward_timeout=TIMEOUT, backward_timeout=TIMEOUT,
                                       max_batch_size=manifest.max_batch_size, auditor=a)
                  for name, a in (("audits off", None), ("audits on", auditor))}
        for moe in layers.values():
            moe.live.refresh(30.0)
            measure(moe_step(moe, 16, exp.d_model), 0.0, warmup=0, max_calls=1)
        runs = alternate({name: partial(measure, moe_step(moe, args.tokens, exp.d_model), args.seconds, warmup=0)
                          for name, moe in layers.items()}, args.rounds)
        auditor.wait_idle(60.0)
        steps = {name: median(r.per_second / args.tokens for r in rates) for name, rates in runs.items()}
        on_over_off = paired_ratio(runs["audits on"], runs["audits off"])
        stored, weights, keep = version_memory(exp, args.tokens)
        rounds = [on.per_second / off.per_second for on, off in zip(runs["audits on"], runs["audits off"])]
        verdicts = auditor.verdicts()
        print_table(f"trainer steps/s, forward+backward of {args.tokens} tokens, median of {args.rounds} "
                    "alternating rounds", ["layer", "steps/s"], [[name, f"{v:.2f}"] for name, v in steps.items()])
        print(f"audits: {sum(a for a, _ in verdicts.values())} checked, {sum(p for _, p in verdicts.values())} "
              f"passed, {len(auditor.failures)} failed, {auditor.skipped} skipped")
        print(f"on / off per round: {', '.join(f'{r:.3f}' for r in rounds)} (median {on_over_off:.3f}, "
              f"min {min(rounds):.3f}, max {max(rounds):.3f})")
        print(f"audit memory per expert (server): {stored / 2**20:.2f} MiB for {keep} versions "
              f"= {stored / weights:.1f}x the expert's weights ({weights / 2**20:.2f} MiB)")
        print_key("audit_overhead", {"on_over_off": f"{on_over_off:.3f}", "steps_off": f"{steps['audits off']:.2f}",
                                     "steps_on": f"{steps['audits on']:.2f}",
                                     "memory_mib_per_expert": f"{stored / 2**20:.2f}"})
        auditor.shutdown()


if __name__ == "__main__":
    main()
