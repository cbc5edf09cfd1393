"""The trainer's MoE layer through the swarm: ``BatchedRemoteMoE`` vs hivemind's ``RemoteMixtureOfExperts``.

Two ``volunteer start`` processes serve the 8 experts of one layer (4 each, as in the swarm tests). In
this process, one client peer holds both layers over the same experts with the same gating width
(top k=2 over the grid) and timeouts; each step is a forward and a backward of ``tokens`` samples
(``x [tokens, d_model] -> y``, ``y.pow(2).mean().backward()``), which trains the experts as the trainer
does. ``BatchedRemoteMoE`` sends each chosen expert one call per step; ``RemoteMixtureOfExperts``
one call per sample per expert, so its large-batch steps take many seconds: those are timed once.
The two alternate (batched, hivemind, batched, hivemind) at every token count. Each layer has its own
client peer: in some runs here the client DHT process under ``RemoteMixtureOfExperts`` died
(``BlockingIOError`` then ``EOFError`` in ``DHT._run``'s pipe read) and its next call hung; such a round
is reported as failed (every call is bounded) and the layer is not measured again in that run.

    .venv/bin/python -m bench.trainer_dispatch [--tokens 16,256,1024] [--rounds 2]
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from hivemind.moe import RemoteMixtureOfExperts

from bench._common import (
    BenchExperiment,
    Rate,
    Swarm,
    alternate,
    bench_args,
    machine_line,
    measure,
    median,
    paired_ratio,
    print_key,
    print_table,
    wait_experts,
)
from coordinator_seeds.dispatch import BatchedRemoteMoE

TIMEOUT = 30.0


def moe_step(layer: torch.nn.Module, tokens: int, d_model: int) -> Callable[[], Callable[[], int]]:
    def make() -> Callable[[], int]:
        x = torch.randn(tokens, d_model, requires_grad=True)

        def step() -> int:
            layer(x).pow(2).mean().backward()
            return tokens

        return step

    return make


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], seconds=3.0)
    parser.add_argument("--tokens", default="16,256,1024")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    exp = BenchExperiment()
    manifest = exp.manifest()
    layer = manifest.layers[0]
    print(machine_line())
    print(f"expert: {exp.describe()}; 2 volunteers x 4 experts; k=2; timeouts {TIMEOUT:.0f} s")

    with Swarm(exp, keep=args.keep) as swarm:
        uids = []
        for name in ("volunteer-a", "volunteer-b"):  # one after the other: the second takes the other half
            uids += swarm.wait_serving(swarm.start_volunteer(name, max_experts=4)).uids
        assert sorted(uids) == sorted(layer.uids()), f"the volunteers serve {uids}, not the whole grid"
        # one client peer per layer: each layer's DHT calls go through its own DHT process and pipe
        clients = {name: swarm.client() for name in ("batched", "hivemind")}
        for client in clients.values():
            wait_experts(client, layer.uids())
        torch.manual_seed(0)
        layers = {
            "batched": BatchedRemoteMoE(exp.d_model, layer, clients["batched"], k_best=2, forward_timeout=TIMEOUT,
                                        backward_timeout=TIMEOUT, max_batch_size=manifest.max_batch_size),
            "hivemind": RemoteMixtureOfExperts(in_features=exp.d_model, grid_size=layer.grid,
                                               dht=clients["hivemind"], uid_prefix=f"{layer.uid_prefix}.",
                                               k_best=2, k_min=1, forward_timeout=TIMEOUT,
                                               backward_timeout=TIMEOUT),
        }
        for moe in layers.values():  # expert lookup, expert info, first connections; bounded
            measure(moe_step(moe, 16, exp.d_model), 0.0, warmup=0, max_calls=1)

        rows, figures, failures = [], {}, []

        def run(name: str, tokens: int) -> Rate | None:
            """One timed round; None once the layer has failed (hivemind's MoE can lose its DHT process)."""
            if any(f.startswith(name) for f in failures):
                return None
            try:
                return measure(moe_step(layers[name], tokens, exp.d_model), args.seconds, warmup=0,
                               max_calls=1 if name == "hivemind" and tokens > 64 else 100_000, call_timeout=90)
            except Exception as e:
                failures.append(f"{name} at {tokens} tokens: {type(e).__name__}: {e} (client DHT alive: "
                                f"{clients[name].is_alive()})")
                return None

        for tokens in [int(t) for t in args.tokens.split(",") if t]:
            runs = alternate({name: partial(run, name, tokens) for name in layers}, args.rounds)
            done = {name: [r for r in rates if r is not None] for name, rates in runs.items()}
            pairs = [(b, h) for b, h in zip(runs["batched"], runs["hivemind"]) if b is not None and h is not None]
            key = paired_ratio([b for b, _ in pairs], [h for _, h in pairs]) if pairs else float("nan")
            rows.append([tokens, *(median(r.per_second for r in done[n]) if done[n] else "failed" for n in layers),
                         *(f"{median(r.seconds / r.calls for r in done[n]):.3f}" if done[n] else "-" for n in layers),
                         f"{key:.1f}x"])
            figures[f"batched_over_hivemind_t{tokens}"] = f"{key:.1f}"
        print_table(f"tokens/s through one MoE layer, forward+backward, median of {args.rounds} alternating rounds",
                    ["tokens", "BatchedRemoteMoE", "RemoteMixtureOfExperts", "batched s/step", "hivemind s/step",
                     "batched/hivemind"], rows)
        for failure in failures:
            print(f"failed: {failure}")
        calls = layers["batched"]
        print(f"BatchedRemoteMoE: {calls.calls_ok} calls ok, {calls.calls_failed} failed")
        print_key("trainer_dispatch", figures)


if __name__ == "__main__":
    main()
