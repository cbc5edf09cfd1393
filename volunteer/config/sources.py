"""Where each setting comes from: flags > environment ``VOLUNTEER_*`` > ``volunteer.toml`` > defaults.

``KEYS`` has one row per setting: its TOML key (the ``Settings`` field name), its environment variable
and flag, how text and TOML values are parsed, and its help. ``resolve_settings`` layers the sources
and remembers, per setting, which one won, so ``volunteer config show`` can say why a value is what it
is. The config file is only ever read: the client never writes it, so a hand-edited file stays as its
owner wrote it. Every bad input is a ``ConfigError`` of one line naming the file, variable or flag.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volunteer.config.settings import SettingError, Settings
from volunteer.core.paths import HOME_ENV, default_paths

CONFIG_NAME = "volunteer.toml"
MAX_CONFIG_BYTES = 64 * 1024  # a settings file is a few hundred bytes; anything near this is the wrong file
ENV_PREFIX = "VOLUNTEER_"
NOT_SETTINGS = frozenset({HOME_ENV})  # VOLUNTEER_* variables that other modules read
_MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_TEXT_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class ConfigError(ValueError):
    """A bad config file, environment variable or flag; the message is one line naming it."""


# --- parsing one value: each raises ValueError saying what was expected; the caller adds where from ---


def parse_memory(text: str | None, name: str = "--max-memory") -> float | int | None:
    """``0.5`` is a fraction of free memory; ``12GiB``, ``800MB`` or a plain integer are bytes."""
    if text is None:
        return None
    try:
        return _memory_text(text)
    except ValueError as e:
        raise ValueError(f"{name} {text!r}: {e}") from None


def _memory_text(text: str) -> float | int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _MEMORY_UNITS:
        raise ValueError("give a fraction like 0.5 or a size like 8GiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit and number <= 1:
        return number
    if not unit and not number.is_integer():
        raise ValueError("a fraction must be at most 1; sizes need a unit (8GiB)")
    size = number * _MEMORY_UNITS[unit]
    if not math.isfinite(size) or size > 2**60:  # float("1" * 400) is inf; int(inf) would raise OverflowError
        raise ValueError("that size is beyond any machine; give a fraction like 0.5 or a size like 8GiB")
    return int(size)


def _memory_toml(value: Any) -> float | int:
    if isinstance(value, str):
        return _memory_text(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError
    # the same rule as for text: a number up to 1 is a fraction, above it a whole number of bytes
    if value <= 1:
        return float(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("a fraction must be at most 1; sizes need a unit (\"8GiB\")")
    return int(value)


def format_memory(value: float | None) -> float | str | None:
    """Bytes as text that ``parse_memory`` reads back to the same number; fractions stay numbers."""
    if value is None or isinstance(value, float):
        return value
    for unit in ("GiB", "MiB", "KiB"):
        if value % _MEMORY_UNITS[unit.lower()] == 0:
            return f"{value // _MEMORY_UNITS[unit.lower()]}{unit}"
    return f"{value}B"


def _bool_text(text: str) -> bool:
    try:
        return _TEXT_BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError("expected one of 1/0, true/false, yes/no") from None


def _auto_bool_text(text: str) -> bool | None:
    return None if text.strip().lower() == "auto" else _bool_text(text)


def _int_text(text: str) -> int:
    if not re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", text):
        raise ValueError("expected a whole number")
    return int(text)


def _float_text(text: str) -> float:
    if not re.fullmatch(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*", text):
        raise ValueError("expected a number")
    return float(text)


def _peers_text(text: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[,\s]+", text) if p)


def _expect(*types: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise TypeError
        return value
    return check


def _peers_toml(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return _peers_text(value)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError
    return tuple(p for item in value for p in _peers_text(item))


def _auto_bool_toml(value: Any) -> bool | None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return _expect(bool)(value)


@dataclass(frozen=True)
class Kind:
    expected: str  # for "expected ..., got ..." messages
    text: Callable[[str], Any]  # environment variables and flags given as text
    toml: Callable[[Any], Any]  # a value tomllib produced; raises TypeError for the wrong type
    render: Callable[[Any], Any] = lambda value: value  # back to TOML/JSON, so that it parses to the same


def _optional(text: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda s: text(s) if s.strip() else None


STR = Kind("a string", str.strip, _expect(str))
OPT_STR = Kind("a string", _optional(str.strip), lambda v: _expect(str)(v).strip() or None)
INT = Kind("an integer", _int_text, _expect(int))
FLOAT = Kind("a number", _float_text, lambda v: float(_expect(int, float)(v)))
BOOL = Kind("true or false", _bool_text, _expect(bool))
AUTO_BOOL = Kind("true, false or \"auto\"", _auto_bool_text, _auto_bool_toml)
def _path_text(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~nobody": no such user, so no home to expand to
        raise ValueError(f"cannot expand {text.split('/')[0]!r}: no such user") from None


PATH = Kind("a path", _optional(_path_text), lambda v: PATH.text(_expect(str)(v)), str)
MEMORY = Kind("a fraction or a size", _memory_text, _memory_toml, format_memory)
PEERS = Kind("a list of multiaddrs", _peers_text, _peers_toml, list)


@dataclass(frozen=True)
class Key:
    name: str  # the Settings field, and the key in volunteer.toml
    kind: Kind
    help: str
    unset: str = "none"  # how config show words None
    flag_name: str = ""  # when it is not --<name with dashes>

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.name.replace("_", "-")


KEYS: tuple[Key, ...] = (
    Key("coordinator", OPT_STR, "http(s) URL of a coordinator seed"),
    Key("initial_peers", PEERS, "DHT multiaddrs to join, with experiment_file"),
    Key("experiment_file", PATH, "experiment manifest (TOML or JSON) instead of a coordinator",
        flag_name="--experiment"),
    Key("host", STR, "address the DHT and expert RPCs listen on"),
    Key("port", INT, "TCP port for the DHT and experts; 0 = any free port"),
    Key("announce_host", OPT_STR, "public address to announce, behind port forwarding"),
    Key("device", OPT_STR, "cpu, cuda (every GPU) or cuda:N", unset="auto"),
    Key("gpus", OPT_STR, "serve on these GPUs only: indices or UUIDs, like 0,2", unset="all"),
    Key("max_memory", MEMORY, "memory budget: a fraction (0.5) or a size (\"8GiB\")", unset="auto"),
    Key("max_experts", INT, "host at most this many experts", unset="no limit"),
    Key("num_handlers", INT, "connection handler processes"),
    Key("checkpoint_interval", FLOAT, "seconds between checkpoints"),
    Key("announce_interval", FLOAT, "seconds between re-announcements in the DHT"),
    Key("headless", BOOL, "JSON log lines instead of a dashboard"),
    Key("log_interval", FLOAT, "seconds between headless log lines"),
    Key("cpu_threads", INT, "torch threads for serving", unset="auto"),
    Key("power", STR, "light, medium or full: batch size and duty cycle"),
    Key("max_temp", FLOAT, "pause while the GPU is hotter than this (Celsius)"),
    Key("run_hours", OPT_STR, "serve only in this daily window, like 22-08", unset="always"),
    Key("pause_on_gpu_use", BOOL, "pause while another process uses the GPU"),
    Key("stats", BOOL, "count samples and time requests"),
    Key("dashboard", AUTO_BOOL, "live dashboard; auto = when stdout is a terminal", unset="auto"),
    Key("remeasure", BOOL, "re-run the throughput micro-benchmark instead of using its cache"),
    Key("rebalance_period", FLOAT, "mean seconds between checks for a better choice of experts; 0 = never"),
)
KEY_BY_NAME = {key.name: key for key in KEYS}


def default_config_file() -> Path:
    return default_paths().config_dir / CONFIG_NAME


# --- layering ---


@dataclass(frozen=True)
class ResolvedSettings:
    settings: Settings
    sources: dict[str, str]  # field -> "default" | "<config file path>" | "env VOLUNTEER_X" | "flag --x"
    config_file: Path
    config_file_found: bool = False
    warnings: tuple[str, ...] = ()  # ignored VOLUNTEER_* variables, most likely typos

    def values(self) -> dict[str, Any]:
        """Every setting as TOML/JSON values (None where unset); what ``to_dict`` and the table show."""
        return {key.name: _render(key, getattr(self.settings, key.name)) for key in KEYS}

    def to_dict(self) -> dict[str, Any]:
        return {"config_file": str(self.config_file), "config_file_found": self.config_file_found,
                "settings": self.values(), "sources": dict(self.sources), "warnings": list(self.warnings)}

    def format_table(self) -> str:
        found = "" if self.config_file_found else " (not found; nothing read from it)"
        lines = [f"# config file: {self.config_file}{found}"]
        width = max(len(key.name) for key in KEYS)
        for key, value in zip(KEYS, self.values().values()):
            shown = key.unset if value is None else json.dumps(value)
            lines.append(f"{key.name:<{width}} = {shown}  ({self.sources[key.name]})")
        lines += [f"# warning: {line}" for line in self.warnings]
        return "\n".join(lines)


def resolve_settings(
    flags: Mapping[str, Any], env: Mapping[str, str] = os.environ, config_file: Path | None = None
) -> ResolvedSettings:
    """Layer defaults, the config file, ``VOLUNTEER_*`` variables and the flags the user actually gave.

    ``flags`` maps Settings field names to values; None means "not given". Values may be typed
    already or text, which is parsed like the environment's. ``config_file`` defaults to
    ``volunteer.toml`` in the config dir; a missing file is no error.
    """
    path = default_config_file() if config_file is None else config_file
    values: dict[str, Any] = {}
    sources = {key.name: "default" for key in KEYS}
    ranks = {key.name: 0 for key in KEYS}
    document = read_config_file(path)
    layers = (_from_file(path, document) if document is not None else {}, _from_env(env), _from_flags(flags))
    for rank, layer in enumerate(layers, start=1):
        for name, (value, origin) in layer.items():
            values[name], sources[name], ranks[name] = value, origin, rank
    _drop_overridden_alternatives(values, sources, ranks)
    try:
        settings = Settings(**values)
    except SettingError as e:
        raise ConfigError(_explain(e, sources)) from None
    return ResolvedSettings(settings, sources, path, document is not None, _unknown_env(env))


def read_config_file(path: Path) -> dict[str, Any] | None:
    """The parsed TOML document, or None when there is no file; bounded, never written."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: not a regular file")  # a FIFO would block the open below
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; is it the right file?")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None


def _from_file(path: Path, document: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    parsed = {}
    for name, value in document.items():
        key = KEY_BY_NAME.get(name)
        if key is None:
            raise ConfigError(f"{path}: unknown key {name!r}{_did_you_mean(name, KEY_BY_NAME)}")
        try:
            parsed[name] = (key.kind.toml(value), str(path))
        except TypeError:
            raise ConfigError(f"{path}: {name}: expected {key.kind.expected}, got {_describe(value)}") from None
        except (ValueError, OverflowError) as e:
            raise ConfigError(f"{path}: {name} = {_short(value)}: {e}") from None
        if key.kind is PATH and parsed[name][0] is not None:
            # relative to the file, not to wherever the client happens to be started
            parsed[name] = ((path.parent / parsed[name][0]).absolute(), str(path))
    return parsed


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    parsed = {}
    for key in KEYS:
        text = env.get(key.env)
        if text is None or not text.strip():  # an empty variable reads as unset, as in most shells' idioms
            continue
        try:
            parsed[key.name] = (key.kind.text(text), f"env {key.env}")
        except ValueError as e:
            raise ConfigError(f"env {key.env}={_short(text)}: {e}") from None
    return parsed


def _from_flags(flags: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    parsed = {}
    for name, value in flags.items():
        key = KEY_BY_NAME.get(name)
        if key is None:
            raise TypeError(f"resolve_settings: {name!r} is not a setting")  # a bug in the caller, not input
        if value is None:
            continue
        try:
            parsed[name] = (_flag_value(key, value), f"flag {key.flag}")
        except ValueError as e:
            raise ConfigError(f"{key.flag} {_short(value)}: {e}") from None
    return parsed


def _flag_value(key: Key, value: Any) -> Any:
    if key.kind is PEERS and isinstance(value, (list, tuple)):
        return tuple(p for item in value for p in _peers_text(item))
    if isinstance(value, str):
        return key.kind.text(value)
    if key.kind is FLOAT and isinstance(value, int):
        return float(value)
    return value


ALTERNATIVES = (("coordinator", "experiment_file"), ("headless", "dashboard"))


def _drop_overridden_alternatives(values: dict[str, Any], sources: dict[str, str], ranks: dict[str, int]) -> None:
    """``--experiment`` on the command line beats a coordinator from the environment, and vice versa.

    Each pair is one choice, so precedence applies to the pair: only when both come from the same
    layer is it a conflict (which Settings reports).
    """
    for pair in ALTERNATIVES:
        if not all(values.get(name) for name in pair) or ranks[pair[0]] == ranks[pair[1]]:
            continue
        loser, winner = sorted(pair, key=ranks.__getitem__)
        del values[loser]
        sources[loser] = f"default; {sources[loser]} overridden by {sources[winner]}"


def _explain(error: SettingError, sources: Mapping[str, str]) -> str:
    given = [(name, sources[name]) for name in error.fields if sources.get(name, "default") != "default"]
    if len({where for _, where in given}) == 1:
        return f"{given[0][1]}: {error}"
    if given:
        return f"{error} ({'; '.join(f'{name} from {where}' for name, where in given)})"
    return str(error)


def _unknown_env(env: Mapping[str, str]) -> tuple[str, ...]:
    known = {key.env for key in KEYS} | NOT_SETTINGS
    return tuple(
        f"{name} is not a setting; ignored{_did_you_mean(name, known)}"
        for name in sorted(env) if name.startswith(ENV_PREFIX) and name not in known
    )


def _render(key: Key, value: Any) -> Any:
    return None if value is None else key.kind.render(value)


def _did_you_mean(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "a table"}
    return kinds.get(type(value), f"a {type(value).__name__}") + f" {_short(value)}"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
