"""The allowlist of expert blocks and optimizers, as data: names, sizes and state counts, no torch.

The manifest is validated against these tables and planning sizes experts from them, so both stay
importable without torch; ``volunteer.serving.experts`` builds the modules and optimizers they name.
A manifest names blocks and optimizers only from here: nothing from the network is imported or run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BlockShape:
    """One allowlisted block: how many weights and activations it has for a width and inner width."""

    params: Callable[[int, int], int]
    # floats kept per sample between forward and backward (activations), used for memory planning
    activations_per_sample: Callable[[int, int], int]
    fixed_hidden_ratio: int | None = None  # hivemind's built-in "ffn" is always 4 x d_model


def _ffn_params(d: int, h: int) -> int:
    return d * h + h + h * d + d + 2 * d


BLOCKS: dict[str, BlockShape] = {
    "ffn": BlockShape(params=_ffn_params, activations_per_sample=lambda d, h: 3 * h + 4 * d, fixed_hidden_ratio=4),
    "residual_ffn": BlockShape(params=_ffn_params, activations_per_sample=lambda d, h: 3 * h + 4 * d),
    "swiglu_ffn": BlockShape(params=lambda d, h: 2 * d * h + h * d + 2 * d,
                             activations_per_sample=lambda d, h: 5 * h + 4 * d),
}


@dataclass(frozen=True)
class OptimizerKind:
    """One allowlisted optimizer: the ``torch.optim`` class that builds it and the parameter-sized
    tensors it keeps per weight (what memory planning counts)."""

    torch_class: str
    states: int


OPTIMIZERS: dict[str, OptimizerKind] = {
    "adam": OptimizerKind("Adam", states=2),  # exp_avg, exp_avg_sq
    "adamw": OptimizerKind("AdamW", states=2),
    "sgd": OptimizerKind("SGD", states=0),  # plain SGD: the manifest has no momentum
}
