"""The experiment manifest: what the swarm trains, validated before anything is built from it.

A manifest arrives from a coordinator over HTTP (JSON) or from a local file (TOML or JSON). Parsing is
strict: unknown keys, wrong types, unknown expert blocks and absurd sizes are refused with one line
naming the field, so a bad manifest can never reach torch or hivemind.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from volunteer.core.blocks import BLOCKS, OPTIMIZERS

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 256 * 1024
MAX_EXPERT_PARAMS = 2**31  # 8 GiB of fp32 weights for one expert is already more than any volunteer holds
MAX_GRID_UIDS = 65536
# How activations and gradients cross the network (``volunteer.core.wire`` maps these to hivemind's
# compressions): float16 halves the bytes of every expert call, which is what a step over a WAN waits on.
WIRE_DTYPES = ("float32", "float16")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message is one line naming the offending field."""


@dataclass(frozen=True)
class ExpertType:
    name: str
    block: str
    d_hidden: int

    def num_params(self, d_model: int) -> int:
        return BLOCKS[self.block].params(d_model, self.d_hidden)


@dataclass(frozen=True)
class MoELayer:
    uid_prefix: str
    grid: tuple[int, ...]
    expert_type: str

    def uids(self) -> list[str]:
        return [f"{self.uid_prefix}." + ".".join(map(str, c)) for c in itertools.product(*map(range, self.grid))]


@dataclass(frozen=True)
class Optimizer:
    name: str = "adam"
    lr: float = 1e-3


@dataclass(frozen=True)
class TrainerSpec:
    """How the coordinator's trainer drives the model; volunteers only read it for display."""

    seq_len: int = 64
    batch_size: int = 16
    k_best: int = 2
    lr: float = 3e-3


@dataclass(frozen=True)
class Manifest:
    name: str
    dht_prefix: str
    d_model: int
    max_batch_size: int
    optimizer: Optimizer
    expert_types: tuple[ExpertType, ...]
    layers: tuple[MoELayer, ...]
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    schema_version: int = SCHEMA_VERSION
    wire_dtype: str = "float32"  # one of WIRE_DTYPES; volunteers declare it in their experts' schemas

    def expert_type(self, name: str) -> ExpertType:
        return next(t for t in self.expert_types if t.name == name)

    def all_uids(self) -> list[str]:
        return [uid for layer in self.layers for uid in layer.uids()]

    def layer_of(self, uid: str) -> MoELayer:
        prefix = uid.split(".", 1)[0]
        for layer in self.layers:
            if layer.uid_prefix == prefix and uid in set(layer.uids()):
                return layer
        raise KeyError(f"uid {uid!r} is not in experiment {self.name!r}")

    def expert_type_of(self, uid: str) -> ExpertType:
        return self.expert_type(self.layer_of(uid).expert_type)

    def to_dict(self) -> dict[str, Any]:
        data = json.loads(json.dumps(asdict(self)))  # tuples become lists, as on the wire
        if data["wire_dtype"] == "float32":  # the default left out: clients older than the key still parse it
            del data["wire_dtype"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        return _parse(data)


# --- loading -------------------------------------------------------------------------------------


def loads(text: str | bytes, *, fmt: str = "json") -> Manifest:
    """Parse a manifest body; ``fmt`` is ``json`` or ``toml``."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest: body is {len(text)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(f"manifest: not UTF-8 text ({e.reason})") from None
    try:
        data = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except (ValueError, RecursionError) as e:  # decode errors, deep nesting, ints over the digit limit
        raise ManifestError(f"manifest: not valid {fmt.upper()}: {str(e).splitlines()[0]}") from None
    return _parse(data)


def load(path: str | Path) -> Manifest:
    """The manifest in the file ``path``; a bare name that is no file (``base``) is a shipped experiment."""
    path = Path(path)
    if shipped_name(path) is not None:
        return shipped_manifest(shipped_name(path))
    try:
        with open(path, "rb") as f:  # bounded: --experiment /dev/zero must not fill the memory
            body = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        hint = f" (shipped experiments: {', '.join(shipped_experiments())})" if len(path.parts) == 1 else ""
        raise ManifestError(f"manifest: cannot read {path}: {e.strerror}{hint}") from None
    return loads(body, fmt="toml" if path.suffix == ".toml" else "json")


def default_manifest() -> Manifest:
    """The experiment shipped with the package, used by ``volunteer demo``."""
    return shipped_manifest("default")


def shipped_experiments() -> tuple[str, ...]:
    """Names of the experiments shipped in ``volunteer/experiments``: default (the demo's, tiny), base
    (CPU-sized), large (GPU-sized)."""
    files = resources.files("volunteer.experiments").iterdir()
    return tuple(sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml")))


def shipped_name(path: Path) -> str | None:
    """``path``'s shipped experiment name if it is a bare name of one and no such file exists here."""
    if len(path.parts) != 1 or path.suffix or path.exists():
        return None
    return path.name if path.name in shipped_experiments() else None


def shipped_manifest(name: str) -> Manifest:
    """A shipped experiment, checked by the same rules as any other manifest."""
    if name not in shipped_experiments():
        raise ManifestError(f"manifest: no shipped experiment {name!r}; shipped: {', '.join(shipped_experiments())}")
    return loads(resources.files("volunteer.experiments").joinpath(f"{name}.toml").read_text(), fmt="toml")


# --- validation ----------------------------------------------------------------------------------


class _Reader:
    """Reads one table of the manifest, failing with the field's full path in the message."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ManifestError(f"manifest: {where or 'top level'} must be a table, got {type(data).__name__}")
        self.data, self.where, self.seen = data, where, set()

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise ManifestError(f"manifest: missing field {self._path(key)}")
            return default
        return self.data[key]

    def int(self, key: str, lo: int, hi: int, default: Any = None) -> int:
        value = self._get(key, _REQUIRED if default is None else default)
        if type(value) is not int:
            raise ManifestError(f"manifest: {self._path(key)} must be an integer, got {value!r:.40}")
        if not lo <= value <= hi:
            raise ManifestError(f"manifest: {self._path(key)} = {value} is outside [{lo}, {hi}]")
        return value

    def float(self, key: str, lo: float, hi: float, default: Any = None) -> float:
        value = self._get(key, _REQUIRED if default is None else default)
        if type(value) not in (int, float) or type(value) is float and not math.isfinite(value):
            raise ManifestError(f"manifest: {self._path(key)} must be a number, got {value!r:.40}")
        if not lo < value <= hi:
            raise ManifestError(f"manifest: {self._path(key)} = {value} is outside ({lo}, {hi}]")
        return float(value)

    def name(self, key: str, default: Any = None, choices: tuple[str, ...] | None = None) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str) or not _NAME.match(value):
            raise ManifestError(
                f"manifest: {self._path(key)} must be a name of letters, digits, '_' or '-', got {value!r:.40}"
            )
        if choices is not None and value not in choices:
            raise ManifestError(f"manifest: {self._path(key)} = {value!r} is not one of {', '.join(choices)}")
        return value

    def list(self, key: str, max_len: int) -> list[Any]:
        value = self._get(key, _REQUIRED)
        if not isinstance(value, list) or not value:
            raise ManifestError(f"manifest: {self._path(key)} must be a non-empty list")
        if len(value) > max_len:
            raise ManifestError(f"manifest: {self._path(key)} has {len(value)} entries, at most {max_len} allowed")
        return value

    def table(self, key: str) -> _Reader:
        return _Reader(self._get(key, {}), self._path(key))

    def items(self, key: str, max_len: int) -> Iterator[_Reader]:
        for i, item in enumerate(self.list(key, max_len)):
            yield _Reader(item, f"{self._path(key)}[{i}]")

    def done(self) -> None:
        extra = sorted(set(self.data) - self.seen, key=str)
        if extra:
            raise ManifestError(f"manifest: unknown field {self._path(str(extra[0]))!r:.80}")


_REQUIRED = object()


def _parse(data: Any) -> Manifest:
    top = _Reader(data, "")
    version = top.int("schema_version", 1, 1_000_000)
    if version != SCHEMA_VERSION:
        raise ManifestError(f"manifest: schema_version {version} is not supported (this client reads {SCHEMA_VERSION})")
    d_model = top.int("d_model", 8, 16384)

    types = []
    for t in top.items("expert_types", 16):
        block_names = tuple(sorted(BLOCKS))
        expert_type = ExpertType(t.name("name"), t.name("block", choices=block_names), t.int("d_hidden", 8, 262144))
        t.done()
        ratio = BLOCKS[expert_type.block].fixed_hidden_ratio
        if ratio is not None and expert_type.d_hidden != ratio * d_model:
            raise ManifestError(f"manifest: {t.where}.d_hidden must be {ratio} x d_model for block {expert_type.block!r}")
        if expert_type.num_params(d_model) > MAX_EXPERT_PARAMS:
            raise ManifestError(f"manifest: {t.where} has {expert_type.num_params(d_model):,} parameters, too many")
        types.append(expert_type)
    _unique([t.name for t in types], "expert_types[].name")

    layers = []
    for raw in top.items("layers", 64):
        prefix = raw.name("uid_prefix")
        grid = tuple(value) if isinstance(value := raw._get("grid", _REQUIRED), list) else ()
        if not grid or len(grid) > 4 or any(type(g) is not int or not 1 <= g <= 4096 for g in grid):
            raise ManifestError(f"manifest: {raw.where}.grid must be 1 to 4 integers in [1, 4096]")
        if math.prod(grid) > MAX_GRID_UIDS:
            raise ManifestError(f"manifest: {raw.where}.grid has {math.prod(grid)} experts, at most {MAX_GRID_UIDS}")
        layer = MoELayer(prefix, grid, raw.name("expert_type", choices=tuple(t.name for t in types)))
        raw.done()
        layers.append(layer)
    _unique([layer.uid_prefix for layer in layers], "layers[].uid_prefix")

    opt = top.table("optimizer")
    optimizer = Optimizer(opt.name("name", "adam", choices=tuple(OPTIMIZERS)), opt.float("lr", 0.0, 1.0, 1e-3))
    opt.done()
    tr = top.table("trainer")
    trainer = TrainerSpec(
        seq_len=tr.int("seq_len", 1, 4096, 64),
        batch_size=tr.int("batch_size", 1, 4096, 16),
        k_best=tr.int("k_best", 1, 64, 2),
        lr=tr.float("lr", 0.0, 1.0, 3e-3),
    )
    tr.done()
    manifest = Manifest(
        name=top.name("name"),
        dht_prefix=top.name("dht_prefix"),
        d_model=d_model,
        max_batch_size=top.int("max_batch_size", 1, 65536, 1024),
        optimizer=optimizer,
        expert_types=tuple(types),
        layers=tuple(layers),
        trainer=trainer,
        schema_version=version,
        wire_dtype=top.name("wire_dtype", "float32", choices=WIRE_DTYPES),
    )
    top.done()
    return manifest


def _unique(names: list[str], what: str) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ManifestError(f"manifest: {what} {duplicates[0]!r} appears more than once")
