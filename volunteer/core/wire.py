"""How an experiment's activations and gradients cross the network: the manifest's ``wire_dtype`` as
hivemind's tensor compression.

Volunteers declare the compression in their experts' schemas (``rpc_info``), so a plain hivemind
``RemoteExpert`` sends inputs and gradients that way and the server answers that way; the project's
trainer reads it from the manifest, which the volunteers built their schemas from. Every serialized
tensor names its own compression, so a server reads any of them whatever its schema says.

``float16`` is hivemind's ``MEANSTD_16BIT``: each row is shifted by its mean and scaled by its standard
deviation (both sent as float32) before the cast to float16, so every row keeps float16's 11 bits. A
plain cast (``FLOAT16``) loses the small gradients a language model's experts get: measured on the
network lab's model (d_model 256, 1,024 tokens a batch) the output gradients' median is 1.5e-5, below
float16's normal range (6.1e-5); a plain cast returned them with a relative error of 9.8e-4 and some
flushed to zero, MEANSTD_16BIT with 2.0e-4 (activations: 2.1e-4 either way).
"""

from __future__ import annotations

import warnings

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

NONE = runtime_pb2.CompressionType.NONE
COMPRESSIONS = {"float32": NONE, "float16": runtime_pb2.CompressionType.MEANSTD_16BIT}
# How far a value may move crossing the wire, relative to the largest value of its row: float16 keeps
# 11 significant bits of (x - mean) / std, and |x - mean| <= 2 max |x|.
ROUNDING_RTOL = {"float32": 0.0, "float16": 2.0**-10}
Sent = torch.Tensor | runtime_pb2.Tensor  # a tensor before serialization, or as it went out

# MEANSTD_16BIT's decoder wraps the row statistics in the message's read-only buffer without a copy, and
# torch warns (once a process, on stderr); they are only read (``mul_``/``add_`` write the decoded values).
warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning, "hivemind.compression.floating")


def compression(wire_dtype: str) -> int:
    """hivemind's ``CompressionType`` for a manifest's ``wire_dtype``."""
    return COMPRESSIONS[wire_dtype]


def rounding_rtol(wire_dtype: str) -> float:
    """What an audit must allow beyond its own tolerance: the rounding of the answer on its way back."""
    return ROUNDING_RTOL[wire_dtype]


def serialize(tensor: torch.Tensor, wire: int) -> runtime_pb2.Tensor:
    """``tensor`` as it goes on the wire: floating tensors with ``wire``, others (commitments) as they are."""
    return serialize_torch_tensor(tensor, wire if tensor.is_floating_point() else NONE)


def as_received(tensor: Sent) -> torch.Tensor:
    """What the other end reads from a serialized tensor (the same bytes decode the same everywhere):
    what an audit must recompute from, not the float32 tensor before it was rounded."""
    return tensor if isinstance(tensor, torch.Tensor) else deserialize_torch_tensor(tensor)
