"""The torch modules and optimizers behind the allowlist of ``volunteer.core.blocks``.

In the shared core because both sides build them: a volunteer serves them (``volunteer.serving.experts``
registers them with hivemind), and a trainer rebuilds one to recompute an audited call
(``volunteer.core.audit_check``). Every block maps ``[batch, d_model] -> [batch, d_model]``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from volunteer.core.blocks import BLOCKS, OPTIMIZERS


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


def _hivemind_ffn(d_model: int, _d_hidden: int) -> nn.Module:
    # hivemind's own block, on demand
    from hivemind.moe.server.layers import name_to_block

    return name_to_block["ffn"](d_model)


BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "ffn": _hivemind_ffn,
    "residual_ffn": ResidualFFN,
    "swiglu_ffn": SwiGLUFFN,
}
assert BUILDERS.keys() == BLOCKS.keys(), "every allowlisted block needs a builder"


def build_expert(block: str, d_model: int, d_hidden: int, seed: int | None = None) -> nn.Module:
    """Build an allowlisted block; ``seed`` makes a fresh expert's weights reproducible from its uid."""
    if block not in BLOCKS:
        raise KeyError(f"unknown expert block {block!r}; allowed: {', '.join(sorted(BLOCKS))}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return BUILDERS[block](d_model, d_hidden)
    return BUILDERS[block](d_model, d_hidden)


def build_optimizer(name: str, parameters, lr: float) -> torch.optim.Optimizer:
    """The allowlisted optimizer ``name`` over ``parameters``."""
    return getattr(torch.optim, OPTIMIZERS[name].torch_class)(parameters, lr=lr)
