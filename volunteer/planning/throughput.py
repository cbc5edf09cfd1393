"""What the device really does: training throughput per expert type (cached), and peak memory.

A second or two of real training steps per expert type, at a few batch sizes, tell the volunteer
which batch size is worth asking hivemind for and what it can announce to the swarm. The numbers
depend on the device, torch and the expert, not on the run, so they are cached as JSON under a key
of exactly those (as Petals' ``throughput.py`` does): the next start costs nothing.

``measured_peak`` is what ``memory.PlanCheck`` compares the memory plan with. This module only
measures and returns figures: recording them in a plan is ``choice.measure_plan``'s job, so nothing
here knows what a plan is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import PlainSerializer, TypeAdapter

from volunteer.core.paths import write_atomic
from volunteer.host.hardware import read_proc_sizes

if TYPE_CHECKING:
    import torch

    from volunteer.core.manifest import Manifest

logger = logging.getLogger(__name__)

BATCH_SIZES = (16, 64, 256)
TIME_BUDGET_S = 1.5  # per expert type: `volunteer hardware --plan` on a 2-core box stays within seconds
# The smallest batch within 90% of the best rate: a smaller batch answers the trainer sooner, and the
# last 10% of throughput is not worth the latency.
GOOD_ENOUGH = 0.9
CACHE_VERSION = 1  # bump when the measurement changes meaning; old files then simply miss
DTYPES = ("float32", "float16", "bfloat16")

# samples/s by batch size; JSON keys are text, written in batch order
_ByBatch = Annotated[dict[int, float], PlainSerializer(lambda rates: {str(b): r for b, r in sorted(rates.items())})]


@dataclass(frozen=True)
class Throughput:
    """One expert type's measured training rate on one device."""

    expert_type: str
    device: str  # the device's name (GPU model, or CPU model and cores), as in the cache key
    best_batch_size: int
    samples_per_second: float  # at best_batch_size
    # samples/s for each batch size measured; left out of the hash so a Plan holding it stays hashable
    by_batch: _ByBatch = field(default_factory=dict, hash=False)
    cached: bool = False  # read from the cache rather than measured now

    def to_dict(self) -> dict[str, Any]:
        return THROUGHPUT_JSON.dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Throughput:
        return THROUGHPUT_JSON.validate_python(data)


THROUGHPUT_JSON = TypeAdapter(Throughput)


def measure_throughput(
    manifest: Manifest,
    cache_dir: Path,
    *,
    device: str = "cpu",
    device_name: str,
    max_batch: int | None = None,
    expert_types: Sequence[str] | None = None,
    dtype: str = "float32",
    remeasure: bool = False,
    time_budget: float = TIME_BUDGET_S,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> tuple[Throughput, ...]:
    """Measure (or read from the cache) each expert type on the torch ``device``.

    ``device_name`` names the hardware in the cache key; ``max_batch`` (the memory plan's) caps the
    batch sizes tried; ``expert_types`` defaults to those the manifest's layers use; ``remeasure``
    ignores the cache (and refreshes it).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    names = expert_types if expert_types is not None else dict.fromkeys(layer.expert_type for layer in manifest.layers)
    batches = candidate_batches(max_batch if max_batch is not None else manifest.max_batch_size, batch_sizes)
    results = []
    for name in names:
        expert_type = manifest.expert_type(name)
        key = cache_key(device_name, expert_type.block, manifest.d_model, expert_type.d_hidden,
                        manifest.optimizer.name, dtype, batches)
        path = Path(cache_dir) / "throughput" / f"{_digest(key)}.json"
        result = None if remeasure else _read_cache(path, key)
        if result is not None:
            result = replace(result, expert_type=name)  # two types of one spec share an entry
        else:
            by_batch = measure_rates(expert_type.block, manifest.d_model, expert_type.d_hidden,
                                     manifest.optimizer.name, device=device, dtype=dtype, batch_sizes=batches,
                                     time_budget=time_budget)
            result = Throughput(name, device_name, *pick_batch(by_batch), by_batch=by_batch)
            _write_cache(path, key, result)
        results.append(result)
    return tuple(results)


def candidate_batches(max_batch: int, sizes: Sequence[int] = BATCH_SIZES) -> tuple[int, ...]:
    """The sizes up to ``max_batch``, and ``max_batch`` itself when it falls below the largest size."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    chosen = {b for b in sizes if b <= max_batch}
    if max_batch < max(sizes):
        chosen.add(max_batch)
    return tuple(sorted(chosen))


def pick_batch(by_batch: dict[int, float]) -> tuple[int, float]:
    """(batch, samples/s): the smallest batch within ``GOOD_ENOUGH`` of the best rate."""
    best = max(by_batch.values())
    batch = min(b for b, rate in by_batch.items() if rate >= GOOD_ENOUGH * best)
    return batch, by_batch[batch]


def measured_peak(device: str, status: Path = Path("/proc/self/status")) -> int:
    """Peak bytes this process has held on the torch ``device``.

    GPU: ``torch.cuda.max_memory_allocated``; CPU: the peak resident set (VmHWM), else the current one
    (VmRSS), else ``getrusage``. ``status`` is a test seam.
    """
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    sizes = read_proc_sizes(status)
    for key in ("VmHWM", "VmRSS"):
        if key in sizes:
            return sizes[key]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --- measuring throughput ------------------------------------------------------------------------


def measure_rates(
    block: str, d_model: int, d_hidden: int, optimizer: str, *, device: str = "cpu", dtype: str = "float32",
    batch_sizes: Sequence[int] = BATCH_SIZES, time_budget: float = TIME_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, float]:
    """Samples/s of training steps at each batch size, ``time_budget`` seconds in all (roughly).

    Each batch size gets an equal share of the budget; larger ones are skipped once it is spent, so a
    slow CPU still answers in about ``time_budget`` plus one step.
    """
    import torch

    from volunteer.serving.experts import build_expert, build_optimizer, sample_input

    target = torch.device(device)
    module = build_expert(block, d_model, d_hidden, seed=0).to(target, getattr(torch, dtype))
    opt = build_optimizer(optimizer, module.parameters(), lr=1e-6)  # tiny steps: the weights stay sane
    sync = (lambda: torch.cuda.synchronize(target)) if target.type == "cuda" else (lambda: None)

    def inputs(batch: int) -> torch.Tensor:
        # sample_input only gives the shape (torch.empty): real numbers, since garbage can hold
        # NaNs and denormals that run far slower on a CPU
        return torch.randn_like(sample_input(block, batch, d_model), dtype=getattr(torch, dtype), device=target)

    # a fresh module's first step costs tens of ms of one-off set-up; that is no part of the budget
    _train_step(module, opt, inputs(1))
    sync()
    share = time_budget / len(batch_sizes)
    started, rates = clock(), {}
    for batch in sorted(batch_sizes):
        if rates and clock() - started >= time_budget:
            break
        x = inputs(batch)
        rates[batch] = _rate(lambda x=x: _train_step(module, opt, x), batch, share, clock, sync)
    return rates


def _train_step(module: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """What a served training sample costs, as hivemind's ModuleBackend does it: rpc_forward without
    grad, then rpc_backward recomputes the forward, back-propagates and steps the optimizer."""
    import torch

    with torch.no_grad():
        out = module(x)
    out = module(x.detach().requires_grad_(True))
    torch.autograd.backward(out, grad_tensors=torch.randn_like(out))
    opt.step()
    opt.zero_grad()


def _rate(step: Callable[[], None], batch: int, share: float, clock: Callable[[], float],
          sync: Callable[[], None]) -> float:
    """Samples/s from the median step: a volunteer's box is busy with other work, and one step that
    the scheduler preempted should not halve the figure."""
    start = clock()
    step()  # warm-up: allocates the optimizer state and buffers for this shape; not timed
    sync()
    durations: list[float] = []
    while not durations or clock() - start < share:
        before = clock()
        step()
        sync()  # a GPU queues work asynchronously; only a sync makes the clock honest
        durations.append(clock() - before)
    return batch / max(statistics.median(durations), 1e-9)


# --- the cache -----------------------------------------------------------------------------------


def cache_key(device_name: str, block: str, d_model: int, d_hidden: int, optimizer: str, dtype: str,
              batches: Sequence[int]) -> dict[str, Any]:
    import torch

    return {
        "version": CACHE_VERSION, "device": device_name, "torch": torch.__version__, "block": block,
        "d_model": d_model, "d_hidden": d_hidden, "optimizer": optimizer, "dtype": dtype, "batches": list(batches),
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(path: Path, key: dict[str, Any]) -> Throughput | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        logger.warning(f"throughput cache {path} is unreadable ({e}); measuring again")
        return None
    try:
        data = json.loads(text)
        if data["key"] != key:  # a hand-edited file (or a digest collision): not ours to trust
            raise ValueError(f"it holds another key, {data['key']!r:.200}")
        return replace(Throughput.from_dict(data["result"]), cached=True)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning(f"throughput cache {path} is corrupt ({type(e).__name__}: {e}); measuring again")
        return None


def _write_cache(path: Path, key: dict[str, Any], result: Throughput) -> None:
    body = json.dumps({"key": key, "result": result.to_dict()}, indent=1, sort_keys=True).encode()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(body))
    except OSError as e:  # a read-only or full cache dir costs a re-measure next time, nothing more
        logger.warning(f"could not cache throughput at {path}: {e}")
