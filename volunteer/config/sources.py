"""Where each setting comes from: flags > environment ``VOLUNTEER_*`` > ``volunteer.toml`` > defaults.

Each setting's TOML key, environment variable, flag and how its values are read come from its row of
the settings table (``volunteer.config.settings.KEYS``). ``resolve_settings`` layers the sources
and remembers, per setting, which one won, so ``volunteer config show`` can say why a value is what it
is. The config file is only ever read: the client never writes it, so a hand-edited file stays as its
owner wrote it. Every bad input is a ``ConfigError`` of one line naming the file, variable or flag.
"""

from __future__ import annotations

import difflib
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volunteer.config.kinds import PATH
from volunteer.config.settings import (
    ALTERNATIVES,
    ENV_PREFIX,
    KEY_BY_NAME,
    KEYS,
    SettingError,
    Settings,
)
from volunteer.core.paths import HOME_ENV, default_paths

CONFIG_NAME = "volunteer.toml"
MAX_CONFIG_BYTES = 64 * 1024  # a settings file is a few hundred bytes; anything near this is the wrong file
NOT_SETTINGS = frozenset({HOME_ENV})  # VOLUNTEER_* variables that other modules read


class ConfigError(ValueError):
    """A bad config file, environment variable or flag; the message is one line naming it."""


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
        return {key.name: key.render(getattr(self.settings, key.name)) for key in KEYS}

    def to_dict(self) -> dict[str, Any]:
        return {"config_file": str(self.config_file), "config_file_found": self.config_file_found,
                "settings": self.values(), "sources": dict(self.sources), "warnings": list(self.warnings)}

    def format_table(self) -> str:
        found = "" if self.config_file_found else " (not found; nothing read from it)"
        lines = [f"# config file: {self.config_file}{found}"]
        width = max(len(key.name) for key in KEYS)
        for key in KEYS:
            shown = key.show(getattr(self.settings, key.name))
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
            parsed[name] = (key.kind.given(value), f"flag {key.flag}")
        except ValueError as e:
            raise ConfigError(f"{key.flag} {_short(value)}: {e}") from None
    return parsed


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
