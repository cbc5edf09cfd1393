"""Audit overhead (issue 14), taken apart: what committing costs a server, what checking costs a trainer,
and trainer steps/s with audits on and off, side by side in one run.

1. **Server commitments** (in this process, before the swarm starts): the lean path's ``DeviceWorker``
   serving one expert as ``AuditedBackend`` (each optimizer step copies the state and hashes it, each
   answer carries its commitment) and as a plain ``CountingBackend``, forward+backward calls of
   ``rows`` rows, in alternating rounds; per round, this process's CPU per call and calls/s, paired
   ratios; and the CPU of the commit alone (``VersionStore.advance``: copy and digest). Both experts
   are the same and run on one intra-op thread. Per expert size of ``--server-sizes``. With
   ``--store-before TREE`` (an earlier commit's ``git archive``), that tree's ``AuditedBackend`` (its
   version store and digest) is a third worker in the same rounds: before and now, paired.
2. **The trainer's check** (in this process): CPU per audited forward and backward call of the bench
   expert: the server encodes the reveal, the trainer decodes it, checks the digests and recomputes.
3. **End to end**: two ``volunteer start`` processes serve the 8 experts of one layer (4 each, lean);
   in this process two of the trainer's layers over the same experts (``replicated_moe``) alternate
   short rounds, one with an ``Auditor`` at ``--rate``, one without. Both call the audited handlers
   (servers always commit), so the difference is the trainer's side of audits: reveals, decoding and
   recomputation, which here share the 2 cores with both volunteers. Per round: steps/s, the paired
   on/off ratio, and CPU per step of this process (the trainer; its DHT peers are counted with it)
   and of the volunteers (serving the reveals).

The memory figure is the server's ``VersionStore`` for one bench expert after more steps than it
keeps (measured here in-process on the same expert).

    .venv/bin/python -m bench.audit_overhead [--tokens 256] [--rounds 16] [--seconds 2.5] [--rate 0.02]
        [--server-sizes 64x256@64,512x2048@256] [--server-rounds 8] [--store-before TREE]
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from bench._common import (
    BenchExperiment,
    CpuMeter,
    Rate,
    Swarm,
    bench_args,
    machine_line,
    measure,
    median,
    print_key,
    print_table,
)
from bench.trainer_dispatch import moe_step
from coordinator_seeds.audit import Auditor, AuditSettings
from coordinator_seeds.replicas import replicated_moe
from coordinator_seeds.strangers import expert_specs
from volunteer.core.audit_check import (
    ExpertSpec,
    Reveal,
    check_backward,
    check_forward,
    decode_reveal,
    encode_reveal,
    find_own_rows,
    rows_digest,
)
from volunteer.core.expert_modules import build_expert, build_optimizer
from volunteer.core.records import join_dht
from volunteer.serving.backends import CountingBackend
from volunteer.serving.batching import DeviceWorker, Task
from volunteer.serving.counters import ExpertCounters
from volunteer.serving.version_budget import version_bytes, versions_to_keep
from volunteer.serving.versions import AuditedBackend, VersionStore

TIMEOUT = 30.0


# --- 1. server commitments --------------------------------------------------------------------------


def lean_worker(backend_class: type[CountingBackend], d_model: int, d_hidden: int, block: str, lr: float,
                rows: int) -> DeviceWorker:
    """One expert on the lean path's device worker, as ``volunteer start`` serves it (started)."""
    module = build_expert(block, d_model, d_hidden, seed=0)
    backend = backend_class("u.0", module, optimizer=build_optimizer("adam", module.parameters(), lr=lr),
                            expert_type="bench", counters=ExpertCounters("u.0", "bench"),
                            args_schema=(BatchTensorDescriptor.from_tensor(torch.empty(1, d_model)),),
                            min_batch_size=1, max_batch_size=max(rows, 1024), pools=False)
    worker = DeviceWorker("cpu", {"u.0": backend})
    worker.start()
    return worker


def worker_step(worker: DeviceWorker, rows: int, d_model: int) -> Callable[[], Callable[[], int]]:
    """A forward then a backward call of ``rows`` rows, each answered before the next is sent."""

    def make() -> Callable[[], int]:
        x, g = torch.randn(rows, d_model), torch.randn(rows, d_model)

        def call(kind: str, inputs: list[torch.Tensor]) -> None:
            future: concurrent.futures.Future = concurrent.futures.Future()
            worker.submit(Task("u.0", kind, inputs, deliver=future.set_result))
            outcome = future.result(timeout=TIMEOUT)
            if isinstance(outcome, BaseException):
                raise outcome

        def step() -> int:
            call("forward", [x])
            call("backward", [x, g])
            return rows

        return step

    return make


def with_process_cpu(run: Callable[[], Rate]) -> Callable[[], Rate]:
    """``run``, with the CPU seconds of this process meanwhile as ``cpu['self']``: the worker's thread,
    the digest's threads and this thread's waits (the idle worker sleeps). Steadier on a loaded
    machine than wall time, which counts the waits for a core."""

    def measured() -> Rate:
        before = time.process_time()
        rate = run()
        return Rate(rate.samples, rate.calls, rate.seconds, {"self": (time.process_time() - before, 0.0)})

    return measured


def server_commit_cost(size: str, exp: BenchExperiment, rounds: int, seconds: float,
                       before_class: type[CountingBackend] | None = None) -> list[str]:
    """``size`` is ``d_model x d_hidden @ rows``; a table row of the paired figures. ``before_class``: an
    earlier tree's ``AuditedBackend`` (``backend_from_tree``), a third worker in the same rounds."""
    dims, rows = size.split("@")
    d_model, d_hidden = map(int, dims.split("x"))
    rows = int(rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    classes = {"audited": AuditedBackend, "plain": CountingBackend, **({"before": before_class} if before_class else {})}
    workers = {name: lean_worker(cls, d_model, d_hidden, exp.block, exp.lr, rows) for name, cls in classes.items()}
    try:
        runs = {name: with_process_cpu(partial(measure, worker_step(w, rows, d_model), seconds, warmup=2))
                for name, w in workers.items()}
        results = {name: [] for name in runs}
        for i in range(rounds):  # ABC, then CBA
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                results[name].append(runs[name]())
        commit_ms = {name: _commit_ms(workers[name].backends["u.0"], rows, d_model) for name in workers if name != "plain"}
    finally:
        for worker in workers.values():
            worker.stop()
            worker.join(10)
        torch.set_num_threads(threads)
    speed = [a.per_second / p.per_second for a, p in zip(results["audited"], results["plain"])]
    cpu = [_cpu_per_call(a) / _cpu_per_call(p) for a, p in zip(results["audited"], results["plain"])]
    plain_ms = median(_cpu_per_call(p) for p in results["plain"])
    row = [f"{d_model}/{d_hidden}", rows, f"{plain_ms:.2f}", f"{commit_ms['audited']:.2f}", _spread(cpu), _spread(speed)]
    if before_class is not None:
        row += [f"{commit_ms['before']:.2f}",
                _spread([_cpu_per_call(b) / _cpu_per_call(p) for b, p in zip(results["before"], results["plain"])]),
                _spread([_cpu_per_call(a) / _cpu_per_call(b) for a, b in zip(results["audited"], results["before"])])]
    return row


def _commit_ms(backend: AuditedBackend, rows: int, d_model: int) -> float:
    """Median CPU ms of ``VersionStore.advance`` alone (copy and digest of one optimizer step's state)."""
    before = backend.versions.current(backend.module, backend.optimizer)
    x = torch.randn(rows, d_model)
    return 1000 * median(_cpu(lambda: backend.versions.advance(backend.module, backend.optimizer, before, x, x))
                         for _ in range(15))


def backend_from_tree(tree: Path) -> type[CountingBackend]:
    """The ``AuditedBackend`` of an earlier source tree (``git archive <commit> | tar -x -C TREE``): its
    ``serving/versions.py`` and the ``core/audit_check.py`` it commits with, imported beside this tree's
    under other names; everything else they import (backends, batching) is this tree's."""
    modules = {}
    for name, path in (("before_audit_check", "volunteer/core/audit_check.py"),
                       ("before_versions", "volunteer/serving/versions.py")):
        spec = importlib.util.spec_from_file_location(name, tree / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it is built
        ours = sys.modules["volunteer.core.audit_check"]
        if name == "before_versions":  # its ``from volunteer.core.audit_check import ...`` gets the old one
            sys.modules["volunteer.core.audit_check"] = modules["before_audit_check"]
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules["volunteer.core.audit_check"] = ours
        modules[name] = module
    return modules["before_versions"].AuditedBackend


def _cpu(f: Callable[[], object]) -> float:
    start = time.process_time()
    f()
    return time.process_time() - start


def _cpu_per_call(rate: Rate) -> float:
    return 1000 * rate.cpu["self"][0] / max(rate.calls, 1)


def _spread(values: Sequence[float]) -> str:
    """Median [quartiles] of paired ratios."""
    if len(values) < 4:
        return f"{median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{median(values):.3f} [{q1:.3f}-{q3:.3f}]"


# --- 2. the trainer's check -------------------------------------------------------------------------


def check_cost(exp: BenchExperiment, rows: int, repeats: int = 30) -> tuple[float, float, int]:
    """CPU ms of one audited forward and one audited backward (the server's encoding of the reveal, the
    trainer's decoding, digests and recomputation), and the bytes of a backward's reveal."""
    spec = ExpertSpec(exp.block, exp.d_model, exp.d_hidden, "adam", exp.lr)
    module = build_expert(exp.block, exp.d_model, exp.d_hidden, seed=0)
    optimizer = build_optimizer("adam", module.parameters(), lr=exp.lr)
    store = VersionStore()
    x, g = torch.randn(rows, exp.d_model), torch.randn(rows, exp.d_model)
    for _ in range(3):
        before = store.current(module, optimizer)
        x_in = x.clone().requires_grad_(True)
        module(x_in).backward(g)
        optimizer.step()
        optimizer.zero_grad()
        after = store.advance(module, optimizer, before, x, g)
    with torch.no_grad():
        output = module(x)

    def forward() -> None:
        check_forward(spec, after, _through_the_wire(store.reveal(after.version), "forward")[0], x, output)

    def backward() -> None:
        reveal = _through_the_wire(store.reveal(after.version), "backward", (x, g))[0]
        check_backward(spec, before, after, reveal, x, g, x_in.grad)

    size = _through_the_wire(store.reveal(after.version), "backward", (x, g))[1]
    return _cpu_ms(forward, repeats), _cpu_ms(backward, repeats), size


def _through_the_wire(kept: Reveal, kind: str, own: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[Reveal, int]:
    """What a trainer decodes of a kept version, as ``RevealService`` sends it (opened for ``kind``, the
    trainer's own rows left out and spliced back), and the bytes of its tensors."""
    opened = kept.opened(kind)
    own_at = None
    if own is not None and opened.inputs is not None:
        own_at = find_own_rows(opened.inputs, opened.grads, len(own[0]), rows_digest(*own))
    header, tensors = encode_reveal(opened, own_at, len(own[0]) if own_at is not None else 0)
    return decode_reveal(header, tensors, own), sum(len(t.buffer) for t in tensors)


def _cpu_ms(f: Callable[[], None], repeats: int) -> float:
    """Median CPU ms of ``f`` on this thread, on one intra-op thread (as an expert this small runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        f()  # warm
        times = []
        for _ in range(repeats):
            start = time.thread_time()
            f()
            times.append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return 1000 * median(times)


# --- 3. end to end -----------------------------------------------------------------------------------


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


def end_to_end(exp: BenchExperiment, args) -> dict[str, object]:
    manifest = exp.manifest()
    layer = manifest.layers[0]
    with Swarm(exp, keep=args.keep) as swarm:
        volunteers = [swarm.start_volunteer(name, max_experts=4) for name in ("volunteer-a", "volunteer-b")]
        for child in volunteers:
            swarm.wait_serving(child)
        # the experiment's validators: a plain hivemind DHT hangs reading signed records (ENGINE-NOTES)
        client = swarm._track(join_dht(manifest.dht_prefix, swarm.initial_peers, client_mode=True))
        auditor = Auditor(expert_specs(manifest), AuditSettings(rate=args.rate))
        torch.manual_seed(0)
        layers = {name: replicated_moe(exp.d_model, layer, client, manifest.dht_prefix, k_best=2,
                                       forward_timeout=TIMEOUT, backward_timeout=TIMEOUT,
                                       max_batch_size=manifest.max_batch_size, auditor=a)
                  for name, a in (("off", None), ("on", auditor))}
        for moe in layers.values():
            moe.live.refresh(30.0)
            measure(moe_step(moe, 16, exp.d_model), 0.0, warmup=0, max_calls=1)
        pids = {child.name: child.proc.pid for child in volunteers}
        runs = {name: partial(_round, moe_step(moe, args.tokens, exp.d_model), args.seconds, pids)
                for name, moe in layers.items()}
        results: dict[str, list[tuple[Rate, float, float]]] = {name: [] for name in runs}
        for i in range(args.rounds):  # ABAB, then BABA: neither side always runs right after the other
            for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
                results[name].append(runs[name]())
        idle = auditor.wait_idle(120.0)
        verdicts = auditor.verdicts()
        auditor.shutdown()
    steps = {name: [r.calls / r.seconds for r, _, _ in rs] for name, rs in results.items()}
    return dict(
        steps=steps, ratios=[on / off for on, off in zip(steps["on"], steps["off"])],
        trainer_cpu={name: [1000 * t / max(r.calls, 1) for r, t, _ in rs] for name, rs in results.items()},
        volunteer_cpu={name: [1000 * v / max(r.calls, 1) for r, _, v in rs] for name, rs in results.items()},
        audited=sum(a for a, _ in verdicts.values()), passed=sum(p for _, p in verdicts.values()),
        failed=len(auditor.failures), skipped=auditor.skipped, idle=idle)


def _round(make_step, seconds: float, volunteer_pids: dict[str, int]) -> tuple[Rate, float, float]:
    """One round: its rate, the CPU seconds of this process and of the volunteers' trees meanwhile."""
    with CpuMeter(**volunteer_pids) as meter:
        before = time.process_time()
        rate = measure(make_step, seconds, warmup=0)
        trainer = time.process_time() - before
    return rate, trainer, sum(total for total, _ in meter.used.values())


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], seconds=2.5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.02)
    parser.add_argument("--server-sizes", default="64x256@64,512x2048@256",
                        help="d_model x d_hidden @ rows a call, for the server's part (comma-separated)")
    parser.add_argument("--server-rounds", type=int, default=8)
    parser.add_argument("--store-before", type=Path, help="source tree of an earlier commit: its audited backend "
                        "in part 1's rounds too (commit CPU and CPU per call, before and now)")
    args = parser.parse_args()
    exp = BenchExperiment()
    rows = args.tokens * 2 // math.prod(exp.grid)  # what one expert gets of a step: k = 2 over the layer's experts
    print(machine_line())
    print(f"expert: {exp.describe()}; 2 volunteers x 4 experts; k=2; {args.tokens} tokens a step "
          f"({rows} rows an expert); audit rate {args.rate:.0%}")

    before_class = backend_from_tree(args.store_before.resolve()) if args.store_before else None
    server_rows = [server_commit_cost(size, exp, args.server_rounds, 0.5, before_class)
                   for size in args.server_sizes.split(",")]
    print_table(f"1. server: audited / plain lean backend, forward+backward calls, {args.server_rounds} alternating "
                "rounds (median [quartiles] of paired ratios)",
                ["expert", "rows", "plain: CPU ms/call", "commit: CPU ms/step", "CPU/call audited/plain",
                 "calls/s audited/plain"] + (["before: commit ms/step", "before: CPU/call audited/plain",
                                              "CPU/call now/before"] if before_class else []), server_rows)

    forward_ms, backward_ms, reveal_bytes = check_cost(exp, rows)
    calls = 2 * math.prod(exp.grid)  # a forward and a backward call per expert a step (each gets tokens at k = 2)
    per_step = args.rate * calls * (forward_ms + backward_ms) / 2
    print(f"2. trainer's check, CPU per audited call: forward {forward_ms:.2f} ms, backward {backward_ms:.2f} ms "
          f"(a backward's reveal is {reveal_bytes / 2**10:.0f} KiB); at {args.rate:.0%} of {calls} calls a step: "
          f"{per_step:.2f} ms of trainer CPU a step")

    e2e = end_to_end(exp, args)
    steps, ratios = e2e["steps"], e2e["ratios"]
    print_table(f"3. end to end: trainer steps/s, forward+backward of {args.tokens} tokens, {args.rounds} alternating "
                f"rounds of {args.seconds:.1f} s", ["audits", "steps/s (median)", "trainer CPU ms/step",
                                                     "volunteers' CPU ms/step"],
                [[name, f"{median(steps[name]):.2f}", f"{median(e2e['trainer_cpu'][name]):.1f}",
                  f"{median(e2e['volunteer_cpu'][name]):.1f}"] for name in ("off", "on")])
    print(f"on / off per round: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"paired on/off: {_spread(ratios)}; mean {statistics.fmean(ratios):.3f} "
          f"+- {2 * statistics.stdev(ratios) / len(ratios) ** 0.5:.3f} (2 standard errors)")
    print(f"audits: {e2e['audited']} checked, {e2e['passed']} passed, {e2e['failed']} failed, {e2e['skipped']} "
          f"skipped{'' if e2e['idle'] else ', some still pending at the end'}")
    stored, weights, keep = version_memory(exp, args.tokens)
    print(f"audit memory per expert (server): {stored / 2**20:.2f} MiB for {keep} versions "
          f"= {stored / weights:.1f}x the expert's weights ({weights / 2**20:.2f} MiB)")
    trainer_extra = median(e2e["trainer_cpu"]["on"]) - median(e2e["trainer_cpu"]["off"])
    print_key("audit_overhead", {"on_over_off": f"{median(ratios):.3f}",
                                 "steps_off": f"{median(steps['off']):.2f}", "steps_on": f"{median(steps['on']):.2f}",
                                 "trainer_cpu_ms_per_step_extra": f"{trainer_extra:.1f}",
                                 "check_ms_per_step": f"{per_step:.2f}",
                                 "memory_mib_per_expert": f"{stored / 2**20:.2f}"})


if __name__ == "__main__":
    main()
