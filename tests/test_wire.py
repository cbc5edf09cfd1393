"""The experiment's wire dtype (``volunteer.core.wire``): what crosses the network, how far it moves, what
the volunteers' schemas declare and what an audit allows. No network here (the strangers tests call a
float16 volunteer for real); each test runs in well under a second."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hivemind.proto import runtime_pb2

from coordinator_seeds.audit import AuditSettings
from coordinator_seeds.strangers import wire_tolerance
from volunteer.core import wire
from volunteer.core.manifest import default_manifest
from volunteer.serving.backends import build_backends
from volunteer.serving.checkpoints import CheckpointStore

FLOAT16 = runtime_pb2.CompressionType.MEANSTD_16BIT


def test_float16_sends_two_bytes_a_value_and_what_the_server_reads_is_kept_exactly():
    x = torch.randn(512, 256)
    sent = wire.serialize(x, wire.compression("float16"))
    assert sent.compression == FLOAT16 and len(sent.buffer) == x.numel() * 2 + len(x) * 8  # + mean, std a row
    assert len(wire.serialize(x, wire.compression("float32")).buffer) == x.numel() * 4
    received = wire.as_received(sent)
    assert not torch.equal(received, x)  # rounded ...
    assert torch.equal(received, wire.as_received(sent))  # ... the same way wherever it is decoded
    assert wire.as_received(x) is x  # a tensor that was not serialized is what was sent


def test_commitments_cross_as_they_are():
    rows = torch.arange(12, dtype=torch.int64).reshape(2, 6)
    sent = wire.serialize(rows, wire.compression("float16"))
    assert sent.compression == runtime_pb2.CompressionType.NONE and torch.equal(wire.as_received(sent), rows)


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (1.5e-5, 0.0), (1.0, 50.0), (1e4, -3e4)])
def test_a_value_moves_at_most_the_rounding_an_audit_allows(scale: float, offset: float):
    """Rows of activations (around 1), of gradients (around 1.5e-5, the lab model's median), far from
    zero: every value stays within ``rounding_rtol`` of its row's largest."""
    torch.manual_seed(0)
    x = torch.randn(256, 256) * scale + offset
    error = (wire.as_received(wire.serialize(x, FLOAT16)) - x).abs().amax(dim=1)
    assert (error <= wire.rounding_rtol("float16") * x.abs().amax(dim=1)).all()


def test_small_gradients_keep_their_precision_where_a_plain_float16_cast_loses_it():
    """Why float16 on the wire is MEANSTD_16BIT, not FLOAT16: gradients at the lab model's scale lie
    below float16's normal range."""
    torch.manual_seed(0)
    grads = torch.randn(1024, 256) * 1.5e-5

    def error(compression: int) -> float:
        received = wire.as_received(wire.serialize(grads, compression))
        return float((received - grads).norm() / grads.norm())

    assert error(FLOAT16) < 3e-4 < 2 * error(FLOAT16) < error(runtime_pb2.CompressionType.FLOAT16)


def test_volunteers_declare_the_wire_dtype_in_both_schemas(tmp_path):
    manifest = default_manifest()
    uid = manifest.all_uids()[0]
    for dtype, expected in (("float32", runtime_pb2.CompressionType.NONE), ("float16", FLOAT16)):
        backends, _ = build_backends(replace(manifest, wire_dtype=dtype), [uid], 64, CheckpointStore(tmp_path / dtype),
                                     pools=False)
        backend = backends[uid]
        assert [backend.args_schema[0].compression, backend.outputs_schema.compression] == [expected, expected]
        assert backend.outputs_schema.size == backend.args_schema[0].size  # the output's shape, from a forward


def test_audits_allow_the_rounding_of_a_float16_answer_and_nothing_more_for_float32():
    settings, manifest = AuditSettings(), default_manifest()
    assert wire_tolerance(settings, manifest) == settings
    half = wire_tolerance(settings, replace(manifest, wire_dtype="float16")).tolerance
    assert half.rtol == settings.tolerance.rtol + 2.0**-10 and half.atol == settings.tolerance.atol
