"""The allowlist of expert blocks a volunteer may build, registered with hivemind.

A manifest names blocks only from ``BLOCKS``; nothing from the network is imported or executed.
Every block maps ``[batch, d_model] -> [batch, d_model]`` so any of them can sit in a MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from hivemind.moe.server.layers import name_to_block, name_to_input
from hivemind.moe.server.layers.custom_experts import register_expert_class
from torch import nn


def _sample_input(batch_size: int, d_model: int) -> torch.Tensor:
    return torch.empty((batch_size, d_model))


class ResidualFFN(nn.Module):
    """Pre-norm feed-forward block, ``x + W2 gelu(W1 LN(x))``, with a free inner width."""

    def __init__(self, d_model: int, d_hidden: int | None = None):
        super().__init__()
        d_hidden = d_hidden or 4 * d_model
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, d_hidden)
        self.down = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class SwiGLUFFN(nn.Module):
    """Gated feed-forward block (SwiGLU), the variant modern MoE language models use."""

    def __init__(self, d_model: int, d_hidden: int | None = None):
        super().__init__()
        d_hidden = d_hidden or 4 * d_model
        self.norm = nn.LayerNorm(d_model)
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(nn.functional.silu(gate) * up)


# Registered under our own names so that plain ``hivemind-server --expert_cls`` can build them too.
for _name, _cls in (("residual_ffn", ResidualFFN), ("swiglu_ffn", SwiGLUFFN)):
    if _name not in name_to_block:
        register_expert_class(_name, _sample_input)(_cls)


@dataclass(frozen=True)
class Block:
    """One allowlisted block: how to build it and how many weights and activations it has."""

    build: Callable[[int, int], nn.Module]
    params: Callable[[int, int], int]
    # floats kept per sample between forward and backward (activations), used for memory planning
    activations_per_sample: Callable[[int, int], int]
    fixed_hidden_ratio: int | None = None  # hivemind's built-in "ffn" is always 4 x d_model


def _ffn_params(d: int, h: int) -> int:
    return d * h + h + h * d + d + 2 * d


BLOCKS: dict[str, Block] = {
    "ffn": Block(
        build=lambda d, h: name_to_block["ffn"](d),
        params=_ffn_params,
        activations_per_sample=lambda d, h: 3 * h + 4 * d,
        fixed_hidden_ratio=4,
    ),
    "residual_ffn": Block(
        build=ResidualFFN,
        params=_ffn_params,
        activations_per_sample=lambda d, h: 3 * h + 4 * d,
    ),
    "swiglu_ffn": Block(
        build=SwiGLUFFN,
        params=lambda d, h: 2 * d * h + h * d + 2 * d,
        activations_per_sample=lambda d, h: 5 * h + 4 * d,
    ),
}


def build_expert(block: str, d_model: int, d_hidden: int, seed: int | None = None) -> nn.Module:
    """Build an allowlisted block; ``seed`` makes a fresh expert's weights reproducible from its uid."""
    if block not in BLOCKS:
        raise KeyError(f"unknown expert block {block!r}; allowed: {', '.join(sorted(BLOCKS))}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return BLOCKS[block].build(d_model, d_hidden)
    return BLOCKS[block].build(d_model, d_hidden)


def sample_input(block: str, batch_size: int, d_model: int) -> torch.Tensor:
    return name_to_input.get(block, _sample_input)(batch_size, d_model)
