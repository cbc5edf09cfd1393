"""The torch modules and optimizers behind the allowlist of ``volunteer.core.blocks``, registered with hivemind.

Every block maps ``[batch, d_model] -> [batch, d_model]`` so any of them can sit in a MoE layer.
"""

from __future__ import annotations

from typing import Callable

import torch
from hivemind.moe.server.layers import name_to_block, name_to_input
from hivemind.moe.server.layers.custom_experts import register_expert_class
from torch import nn

from volunteer.core.blocks import BLOCKS, OPTIMIZERS


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


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "ffn": lambda d, h: name_to_block["ffn"](d),
    "residual_ffn": ResidualFFN,
    "swiglu_ffn": SwiGLUFFN,
}
assert _BUILDERS.keys() == BLOCKS.keys(), "every allowlisted block needs a builder"


def build_expert(block: str, d_model: int, d_hidden: int, seed: int | None = None) -> nn.Module:
    """Build an allowlisted block; ``seed`` makes a fresh expert's weights reproducible from its uid."""
    if block not in BLOCKS:
        raise KeyError(f"unknown expert block {block!r}; allowed: {', '.join(sorted(BLOCKS))}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _BUILDERS[block](d_model, d_hidden)
    return _BUILDERS[block](d_model, d_hidden)


def sample_input(block: str, batch_size: int, d_model: int) -> torch.Tensor:
    return name_to_input.get(block, _sample_input)(batch_size, d_model)


def build_optimizer(name: str, parameters, lr: float) -> torch.optim.Optimizer:
    """The allowlisted optimizer ``name`` over ``parameters``."""
    return getattr(torch.optim, OPTIMIZERS[name].torch_class)(parameters, lr=lr)
