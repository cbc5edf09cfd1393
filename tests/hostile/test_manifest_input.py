"""Bad manifests, read from a file (a FIFO that never ends included) or from a coordinator: one line each."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.fakes import FakeCoordinator
from tests.hostile.common import (
    FAST,
    HUGE_FILE,
    HUGE_HTTP,
    MANIFEST,
    assert_one_line,
    assert_untouched,
    delete_at,
    mutated,
    set_at,
    snapshot,
)
from volunteer.core.manifest import MAX_MANIFEST_BYTES, ManifestError, load
from volunteer.core.seed_client import (
    MAX_BODY_BYTES,
    CoordinatorError,
    Experiment,
    fetch_experiment,
)

# id, body, what the one line says (file, then over HTTP when it differs)
BAD_MANIFESTS = [
    ("missing-d_model", mutated(delete_at(("d_model",))), "manifest: missing field d_model"),
    ("missing-layer-grid", mutated(delete_at(("layers", 0, "grid"))), "manifest: missing field layers[0].grid"),
    ("wrong-type-d_model", mutated(set_at(("d_model",), "32")), "manifest: d_model must be an integer"),
    ("wrong-type-grid", mutated(set_at(("layers", 0, "grid"), "2x4")), "manifest: layers[0].grid must be"),
    ("wrong-type-lr", mutated(set_at(("optimizer", "lr"), [1])), "manifest: optimizer.lr must be a number"),
    ("unknown-block", mutated(set_at(("expert_types", 0, "block"), "transformer")),
     "manifest: expert_types[0].block = 'transformer' is not one of"),
    ("block-as-code", mutated(set_at(("expert_types", 0, "block"), "__import__('os').system('id')")),
     "manifest: expert_types[0].block must be a name"),
    ("negative-d_hidden", mutated(set_at(("expert_types", 0, "d_hidden"), -64)),
     "manifest: expert_types[0].d_hidden = -64 is outside"),
    ("negative-max_batch_size", mutated(set_at(("max_batch_size",), -1)), "manifest: max_batch_size = -1 is outside"),
    ("absurd-d_model", mutated(set_at(("d_model",), 10**12)), "manifest: d_model = 1000000000000 is outside"),
    ("absurd-grid", mutated(set_at(("layers", 0, "grid"), [65536, 65536])), "manifest: layers[0].grid must be"),
    ("absurd-seq_len", mutated(set_at(("trainer", "seq_len"), 10**9)), "manifest: trainer.seq_len = 1000000000"),
    ("huge-body", (HUGE_FILE, HUGE_HTTP),
     (f"more than the {MAX_MANIFEST_BYTES} allowed", f"more than {MAX_BODY_BYTES} allowed")),
]


def _case(body: bytes | tuple[bytes, bytes], expected: str | tuple[str, str], over_http: bool) -> tuple[bytes, str]:
    pick = 1 if over_http else 0
    body = body[pick] if isinstance(body, tuple) else body
    return body, expected[pick] if isinstance(expected, tuple) else expected


@pytest.mark.parametrize("body, expected", [pytest.param(b, e, id=i) for i, b, e in BAD_MANIFESTS])
def test_bad_manifest_file_is_one_line(tmp_path: Path, body, expected: str):
    """What ``volunteer start --experiment FILE`` reads (the CLI table below runs a few end to end)."""
    body, expected = _case(body, expected, over_http=False)
    path = tmp_path / "experiment.json"
    path.write_bytes(body)
    with pytest.raises(ManifestError) as info:
        load(path)
    assert_one_line(info.value, expected)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("body, expected", [pytest.param(b, e, id=i) for i, b, e in BAD_MANIFESTS])
def test_bad_manifest_from_a_coordinator(tmp_path: Path, coordinator: FakeCoordinator, body, expected: str):
    """Not retried (asking again will not fix it); with no cache one line, with a cache the cache, untouched."""
    body, expected = _case(body, expected, over_http=True)
    coordinator.answer(body=body)
    with pytest.raises(CoordinatorError) as info:
        fetch_experiment(coordinator.url, tmp_path / "none", **FAST)
    message = assert_one_line(info.value, f"coordinator {coordinator.url} sent ", expected)
    assert message.endswith("and no cached experiment")
    assert coordinator.hits["/v1/experiment"] == 1
    assert not (tmp_path / "none").exists(), "a refused answer must not be cached"

    cache = tmp_path / "cache"
    coordinator.answer(body=MANIFEST.to_json().encode())
    good = fetch_experiment(coordinator.url, cache, **FAST)
    before = snapshot(cache)
    coordinator.answer(body=body)
    assert fetch_experiment(coordinator.url, cache, **FAST) == Experiment(good.manifest, good.initial_peers, "cache")
    assert_untouched(before, cache)


def test_unbounded_manifest_file_is_not_read_to_the_end(tmp_path: Path):
    """``--experiment /dev/zero`` (or a FIFO that never ends) must stop at the size limit, not fill memory."""
    fifo = tmp_path / "experiment.json"
    os.mkfifo(fifo)
    written, limit = [0], 4 * MAX_BODY_BYTES  # the writer stops here, so a failing test stays small

    def writer() -> None:
        try:
            with open(fifo, "wb") as f:
                while written[0] < limit:
                    f.write(b" " * 65536)
                    written[0] += 65536
        except OSError:
            pass  # the reader stopped reading: what a bounded reader does

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with pytest.raises(ManifestError, match="more than the"):
            load(fifo)
    finally:
        if thread.is_alive():  # unblock a writer still waiting in open() or write()
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
    assert written[0] <= MAX_MANIFEST_BYTES + 4 * 65536
