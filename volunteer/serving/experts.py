"""The torch modules and optimizers behind the allowlist of ``volunteer.core.blocks``, registered with hivemind.

Every block maps ``[batch, d_model] -> [batch, d_model]`` so any of them can sit in a MoE layer.
"""

from __future__ import annotations

import torch
from hivemind.moe.server.layers import name_to_block, name_to_input
from hivemind.moe.server.layers.custom_experts import register_expert_class

# the modules live in the shared core, where a trainer rebuilds them to recompute an audited call
from volunteer.core.expert_modules import (
    ResidualFFN,
    SwiGLUFFN,
    build_expert,
    build_optimizer,
)

__all__ = ["ResidualFFN", "SwiGLUFFN", "build_expert", "build_optimizer", "sample_input"]


def _sample_input(batch_size: int, d_model: int) -> torch.Tensor:
    return torch.empty((batch_size, d_model))


# Registered under our own names so that plain ``hivemind-server --expert_cls`` can build them too.
for _name, _cls in (("residual_ffn", ResidualFFN), ("swiglu_ffn", SwiGLUFFN)):
    if _name not in name_to_block:
        register_expert_class(_name, _sample_input)(_cls)


def sample_input(block: str, batch_size: int, d_model: int) -> torch.Tensor:
    return name_to_input.get(block, _sample_input)(batch_size, d_model)
