"""How one setting's value is read: from text (environment, flags), from TOML, and written back.

A ``Kind`` is a column of the key table in ``volunteer.config.settings``: each setting names its kind
there, and the config engine, ``volunteer config show`` and the ``start`` options all go through it.
Every reader raises ValueError saying what was expected (TOML readers raise TypeError for a value of
the wrong type); the caller adds where the value came from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_TEXT_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


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


def _path_text(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~nobody": no such user, so no home to expand to
        raise ValueError(f"cannot expand {text.split('/')[0]!r}: no such user") from None


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


def _peers_given(value: Any) -> tuple[str, ...]:
    """A repeated flag gives a list, and each item may itself be a comma-separated list."""
    return tuple(p for item in value for p in _peers_text(item))


def _auto_bool_toml(value: Any) -> bool | None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return _expect(bool)(value)


def _optional(text: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda s: text(s) if s.strip() else None


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Kind:
    expected: str  # for "expected ..., got ..." messages
    text: Callable[[str], Any]  # environment variables and flags given as text
    toml: Callable[[Any], Any]  # a value tomllib produced; raises TypeError for the wrong type
    flag_type: type  # what the command line parses a flag of this kind into
    typed: Callable[[Any], Any] = _same  # a flag the command line (or a caller) has already parsed
    render: Callable[[Any], Any] = _same  # back to TOML/JSON, so that it parses to the same

    def given(self, value: Any) -> Any:
        """A flag's value: text is read like the environment's, anything else is already typed."""
        return self.text(value) if isinstance(value, str) else self.typed(value)


STR = Kind("a string", str.strip, _expect(str), str)
OPT_STR = Kind("a string", _optional(str.strip), lambda v: _expect(str)(v).strip() or None, str)
INT = Kind("an integer", _int_text, _expect(int), int)
FLOAT = Kind("a number", _float_text, lambda v: float(_expect(int, float)(v)), float,
             typed=lambda v: float(v) if isinstance(v, int) else v)
BOOL = Kind("true or false", _bool_text, _expect(bool), bool)
AUTO_BOOL = Kind("true, false or \"auto\"", _auto_bool_text, _auto_bool_toml, bool)
PATH = Kind("a path", _optional(_path_text), lambda v: PATH.text(_expect(str)(v)), Path, render=str)
MEMORY = Kind("a fraction or a size", _memory_text, _memory_toml, str, render=format_memory)
PEERS = Kind("a list of multiaddrs", _peers_text, _peers_toml, list[str], typed=_peers_given, render=list)
