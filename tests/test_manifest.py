"""The experiment manifest: the default one loads and round-trips; every bad input is one ManifestError line."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import json_values
from volunteer.core.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    default_manifest,
    load,
    loads,
)

DEFAULT_TOML = resources.files("volunteer.experiments").joinpath("default.toml").read_text()


def default_dict() -> dict[str, Any]:
    return default_manifest().to_dict()


def check_one_line(err: ManifestError, *expected: str) -> None:
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith("manifest: "), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


# --- the default manifest ------------------------------------------------------------------------


def test_default_manifest_loads():
    m = default_manifest()
    assert m.name == "tiny-stdlib-lm" and m.schema_version == 1 and m.d_model == 64
    assert [t.name for t in m.expert_types] == ["small", "large"]
    assert [layer.grid for layer in m.layers] == [(2, 4), (2, 4)]
    assert len(m.all_uids()) == len(set(m.all_uids())) == 16
    assert m.expert_type_of("tinylm_ffn1.1.3").block == "swiglu_ffn"
    with pytest.raises(KeyError):
        m.layer_of("tinylm_ffn0.2.0")  # outside the grid


@pytest.mark.parametrize(
    "roundtrip",
    [
        pytest.param(lambda m: Manifest.from_dict(m.to_dict()), id="to_dict/from_dict"),
        pytest.param(lambda m: loads(m.to_json()), id="to_json/loads"),
        pytest.param(lambda m: loads(m.to_json().encode()), id="to_json/loads-bytes"),
        pytest.param(lambda m: Manifest.from_dict(json.loads(json.dumps(m.to_dict()))), id="through-json"),
        pytest.param(lambda m: loads(DEFAULT_TOML, fmt="toml"), id="toml-text"),
    ],
)
def test_default_manifest_round_trips(roundtrip: Callable[[Manifest], Manifest]):
    m = default_manifest()
    again = roundtrip(m)
    assert again == m
    assert again.to_json() == m.to_json()


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_load_reads_toml_and_json_files(tmp_path: Path, suffix: str):
    path = tmp_path / f"experiment{suffix}"
    path.write_text(DEFAULT_TOML if suffix == ".toml" else default_manifest().to_json())
    assert load(path) == default_manifest()
    assert load(str(path)) == default_manifest()


def test_load_of_the_test_manifest(manifest_file: Path):
    m = load(manifest_file)
    assert m.name == "test-lm" and m.d_model == 32 and len(m.all_uids()) == 8


def test_load_of_a_missing_file_is_one_line(tmp_path: Path):
    with pytest.raises(ManifestError) as err:
        load(tmp_path / "nope.toml")
    check_one_line(err.value, "cannot read", "nope.toml")


# --- bad manifests, table-driven -----------------------------------------------------------------


def mutated(change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    data = default_dict()
    change(data)
    return data


def _set(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *path, key, value = path_and_value

    def change(data: dict[str, Any]) -> None:
        for step in path:
            data = data[step]
        data[key] = value

    return change


def _delete(*path: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for step in path[:-1]:
            data = data[step]
        del data[path[-1]]

    return change


def _dup_layer_prefix(data: dict[str, Any]) -> None:
    data["layers"][1]["uid_prefix"] = data["layers"][0]["uid_prefix"]


def _dup_expert_type(data: dict[str, Any]) -> None:
    data["expert_types"][1]["name"] = data["expert_types"][0]["name"]


def _huge_expert(data: dict[str, Any]) -> None:
    data["d_model"] = 16384
    data["expert_types"][0]["d_hidden"] = 262144  # 2 x 16384 x 262144 > 2**31 parameters


def _ffn_wrong_hidden(data: dict[str, Any]) -> None:
    data["expert_types"][0]["block"] = "ffn"
    data["expert_types"][0]["d_hidden"] = 3 * data["d_model"]


def _ffn_right_hidden(data: dict[str, Any]) -> None:
    data["expert_types"][0]["block"] = "ffn"
    data["expert_types"][0]["d_hidden"] = 4 * data["d_model"]


BAD_DICTS = [
    # missing fields
    ("missing-name", _delete("name"), ["missing field name"]),
    ("missing-d_model", _delete("d_model"), ["missing field d_model"]),
    ("missing-layers", _delete("layers"), ["missing field layers"]),
    ("missing-expert_types", _delete("expert_types"), ["missing field expert_types"]),
    ("missing-schema_version", _delete("schema_version"), ["missing field schema_version"]),
    ("missing-layer-grid", _delete("layers", 0, "grid"), ["missing field layers[0].grid"]),
    ("missing-expert-block", _delete("expert_types", 1, "block"), ["missing field expert_types[1].block"]),
    # wrong types
    ("d_model-string", _set("d_model", "64"), ["d_model must be an integer", "'64'"]),
    ("d_model-float", _set("d_model", 64.0), ["d_model must be an integer", "64.0"]),
    ("d_model-bool", _set("d_model", True), ["d_model must be an integer"]),
    ("d_model-null", _set("d_model", None), ["d_model must be an integer"]),
    ("grid-of-strings", _set("layers", 0, "grid", ["2"]), ["layers[0].grid"]),
    ("grid-of-bools", _set("layers", 0, "grid", [True, True]), ["layers[0].grid"]),
    ("grid-an-int", _set("layers", 0, "grid", 5), ["layers[0].grid"]),
    ("grid-null", _set("layers", 0, "grid", None), ["layers[0].grid"]),
    ("grid-a-table", _set("layers", 0, "grid", {"2": 4}), ["layers[0].grid"]),
    ("lr-string", _set("optimizer", "lr", "fast"), ["optimizer.lr must be a number", "'fast'"]),
    ("lr-nan", _set("optimizer", "lr", float("nan")), ["optimizer.lr must be a number"]),
    ("lr-huge-int", _set("optimizer", "lr", 10**400), ["optimizer.lr"]),
    ("lr-zero", _set("optimizer", "lr", 0), ["optimizer.lr = 0 is outside"]),
    ("name-int", _set("name", 5), ["name must be a name"]),
    ("name-with-newline", _set("name", "a\nb"), ["name must be a name"]),
    ("optimizer-a-list", _set("optimizer", [1]), ["optimizer must be a table"]),
    ("layers-a-table", _set("layers", {"a": 1}), ["layers must be a non-empty list"]),
    ("layers-empty", _set("layers", []), ["layers must be a non-empty list"]),
    ("layer-a-list", _set("layers", 0, [1]), ["layers[0] must be a table, got list"]),
    ("optimizer-unknown", _set("optimizer", "name", "lamb"), ["optimizer.name = 'lamb' is not one of"]),
    # unknown keys
    ("unknown-top-level-key", _set("colour", "blue"), ["unknown field 'colour'"]),
    ("unknown-layer-key", _set("layers", 1, "colour", "blue"), ["unknown field 'layers[1].colour'"]),
    ("unknown-expert-key", _set("expert_types", 0, "code", "rm -rf"), ["unknown field 'expert_types[0].code'"]),
    ("unknown-trainer-key", _set("trainer", "epochs", 3), ["unknown field 'trainer.epochs'"]),
    ("unknown-key-with-newline", _set("a\nb", 1), ["unknown field"]),
    ("unknown-non-string-keys", lambda d: d.update({1: 1, "z": 2}), ["unknown field"]),
    # blocks outside the allowlist
    ("block-transformer", _set("expert_types", 0, "block", "transformer"),
     ["expert_types[0].block", "'transformer' is not one of"]),
    ("block-os.system", _set("expert_types", 0, "block", "os.system"), ["expert_types[0].block", "os.system"]),
    ("block-dunder", _set("expert_types", 1, "block", "__import__"), ["expert_types[1].block"]),
    # references and duplicates
    ("undefined-expert-type", _set("layers", 0, "expert_type", "medium"), ["layers[0].expert_type", "'medium'"]),
    ("duplicate-uid_prefix", _dup_layer_prefix, ["layers[].uid_prefix", "'tinylm_ffn0' appears more than once"]),
    ("duplicate-expert-type", _dup_expert_type, ["expert_types[].name", "'small' appears more than once"]),
    # absurd sizes
    ("d_model-1e9", _set("d_model", 10**9), ["d_model = 1000000000 is outside"]),
    ("d_hidden-negative", _set("expert_types", 0, "d_hidden", -256), ["expert_types[0].d_hidden = -256 is outside"]),
    ("grid-zero", _set("layers", 0, "grid", [0]), ["layers[0].grid must be"]),
    ("grid-4097", _set("layers", 0, "grid", [4097]), ["layers[0].grid must be"]),
    ("grid-five-dims", _set("layers", 0, "grid", [1, 1, 1, 1, 1]), ["layers[0].grid must be"]),
    ("grid-total-too-big", _set("layers", 1, "grid", [256, 257]), ["layers[1].grid has 65792 experts"]),
    ("expert-over-2**31-params", _huge_expert, ["expert_types[0] has", "parameters, too many"]),
    ("max_batch_size-zero", _set("max_batch_size", 0), ["max_batch_size = 0 is outside"]),
    # the built-in ffn block has a fixed width
    ("ffn-d_hidden-not-4x", _ffn_wrong_hidden, ["expert_types[0].d_hidden must be 4 x d_model", "'ffn'"]),
    # versions
    ("schema_version-2", _set("schema_version", 2), ["schema_version 2 is not supported"]),
    ("schema_version-string", _set("schema_version", "1"), ["schema_version must be an integer"]),
    # the wire dtype
    ("wire_dtype-float64", _set("wire_dtype", "float64"), ["wire_dtype = 'float64' is not one of float32, float16"]),
    ("wire_dtype-int", _set("wire_dtype", 16), ["wire_dtype must be a name"]),
]


@pytest.mark.parametrize("change, expected", [pytest.param(c, e, id=i) for i, c, e in BAD_DICTS])
def test_bad_manifest_dict_is_refused_in_one_line(change, expected):
    data = mutated(change)
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(data)
    check_one_line(err.value, *expected)
    # the same answer when the body arrives as JSON over the wire (where JSON can carry it)
    try:
        body = json.dumps(data, allow_nan=True)
    except (TypeError, ValueError):
        return
    with pytest.raises(ManifestError) as wire_err:
        loads(body)
    check_one_line(wire_err.value)


def test_wire_dtype_is_float32_unless_said_and_left_out_of_the_dict_when_default():
    """float32 (what every manifest meant before the key existed) is left out of what a seed serves, so
    clients older than the key still parse it; float16 is kept and survives the round trip."""
    plain = Manifest.from_dict(mutated(lambda d: None))
    assert plain.wire_dtype == "float32" and "wire_dtype" not in plain.to_dict()
    half = Manifest.from_dict(mutated(_set("wire_dtype", "float16")))
    assert half.wire_dtype == "float16" and half.to_dict()["wire_dtype"] == "float16"
    assert Manifest.from_dict(json.loads(half.to_json())) == half


def test_ffn_with_four_times_d_model_is_accepted():
    m = Manifest.from_dict(mutated(_ffn_right_hidden))
    assert m.expert_types[0].block == "ffn" and m.expert_types[0].d_hidden == 4 * m.d_model


def test_a_long_unknown_key_is_cut_short():
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(mutated(_set("x" * 100_000, 1)))
    check_one_line(err.value, "unknown field")
    assert len(str(err.value)) < 200


BAD_BODIES = [
    ("non-utf8", b'{"name": "\xff\xfe"}', "json", ["not UTF-8"]),
    ("body-over-256KiB-bytes", b" " * (MAX_MANIFEST_BYTES + 1), "json",
     [f"more than the {MAX_MANIFEST_BYTES} allowed"]),
    ("body-over-256KiB-text", default_manifest().to_json() + " " * MAX_MANIFEST_BYTES, "json", ["allowed"]),
    ("invalid-json", '{"name": ', "json", ["not valid JSON"]),
    ("json-trailing-garbage", default_manifest().to_json() + "}", "json", ["not valid JSON"]),
    ("empty-json", "", "json", ["not valid JSON"]),
    ("invalid-toml", 'name = "test\nd_model = ', "toml", ["not valid TOML"]),
    ("json-given-as-toml", default_manifest().to_json(), "toml", ["not valid TOML"]),
    ("top-level-list", "[1, 2, 3]", "json", ["top level must be a table, got list"]),
    ("top-level-string", '"manifest"', "json", ["top level must be a table, got str"]),
    ("top-level-null", "null", "json", ["top level must be a table"]),
    ("deeply-nested-json", "[" * 100_000 + "]" * 100_000, "json", ["not valid JSON"]),
    ("deeply-nested-toml", "a = " + "[" * 50_000 + "]" * 50_000, "toml", ["not valid TOML"]),
    ("int-over-digit-limit", '{"d_model": ' + "9" * 5000 + "}", "json", ["not valid JSON"]),
    ("empty-toml", "", "toml", ["missing field"]),
]


@pytest.mark.parametrize("body, fmt, expected", [pytest.param(b, f, e, id=i) for i, b, f, e in BAD_BODIES])
def test_bad_manifest_body_is_refused_in_one_line(body, fmt, expected):
    with pytest.raises(ManifestError) as err:
        loads(body, fmt=fmt)
    check_one_line(err.value, *expected)


@pytest.mark.parametrize("body", [pytest.param(b'\xff[[layers]]', id="non-utf8"), pytest.param(b"[[[", id="invalid")])
def test_bad_manifest_file_is_refused_in_one_line(tmp_path: Path, body: bytes):
    path = tmp_path / "bad.toml"
    path.write_bytes(body)
    with pytest.raises(ManifestError) as err:
        load(path)
    check_one_line(err.value)


# --- property: from_dict never raises anything but ManifestError ---------------------------------

def parse_or_manifest_error(data: Any) -> Manifest | None:
    try:
        return Manifest.from_dict(data)
    except ManifestError as e:
        assert "\n" not in str(e), str(e)
        return None


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_from_dict_of_arbitrary_json_raises_only_manifest_errors(value: Any):
    parse_or_manifest_error(value)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a nested dict/list, as the chain of keys and indices leading to it."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append(prefix + (key,))
        found.extend(_paths(child, prefix + (key,)))
    return found


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_from_dict_of_a_mutated_default_raises_only_manifest_errors(data: st.DataObject):
    manifest = default_dict()
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(manifest)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent = manifest
        for step in path[:-1]:
            parent = parent[step]
        if data.draw(st.booleans(), label="delete"):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values, label="value")
    result = parse_or_manifest_error(copy.deepcopy(manifest))
    if result is not None:  # whatever was accepted must survive the wire unchanged
        assert Manifest.from_dict(result.to_dict()) == result


# --- shipped experiments -------------------------------------------------------------------------


def test_the_shipped_experiments_pass_the_manifest_rules_and_are_chosen_by_name(tmp_path, monkeypatch):
    from volunteer.core.manifest import default_manifest, load, shipped_experiments

    assert {"default", "base", "large"} <= set(shipped_experiments())
    monkeypatch.chdir(tmp_path)
    sizes = {name: max(t.num_params(load(name).d_model) for t in load(name).expert_types)
             for name in ("default", "base", "large")}
    # the demo stays tiny; base is CPU-sized (d_model 512), large GPU-sized (d_model 2048)
    assert sizes["default"] < 200_000 < sizes["base"] < 5_000_000 < sizes["large"]
    assert load("base").d_model == 512 and load("large").d_model == 2048
    assert load("default") == default_manifest()
    # a file of that name here wins over the shipped one; an unknown name says what is shipped
    (tmp_path / "base").write_text(json.dumps(default_manifest().to_dict()))
    assert load("base") == default_manifest()
    with pytest.raises(ManifestError, match="shipped experiments: base, default, large"):
        load("nosuch")
