"""Settings from flags > VOLUNTEER_* > volunteer.toml > defaults: precedence, sources, one-line errors.

Pure functions over a temporary file and a dict for the environment: no processes, well under a second
per test. The property tests build TOML documents from the key table itself, so a new setting is
fuzzed without touching this file.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import tempfile
from dataclasses import fields
from datetime import datetime, time
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from volunteer.config.kinds import format_memory, parse_memory
from volunteer.config.settings import (
    KEY_BY_NAME,
    KEYS,
    POWER_LEVELS,
    RunHours,
    Settings,
)
from volunteer.config.sources import MAX_CONFIG_BYTES, ConfigError, resolve_settings

FAST = hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def to_toml(document: dict[str, Any]) -> str:
    """A minimal TOML writer (the stdlib only reads TOML): scalars, arrays and inline tables."""
    return "".join(f"{_toml_key(key)} = {_toml_value(value)}\n" for key, value in document.items())


def _toml_key(key: str) -> str:
    return key if key and all(c in string.ascii_letters + string.digits + "_-" for c in key) else _toml_str(key)


def _toml_str(text: str) -> str:
    escaped = "".join(
        "\\\\" if c == "\\" else '\\"' if c == '"' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
        for c in text
    )
    return f'"{escaped}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr spells inf and nan the way TOML does
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "volunteer.toml"


def resolve(flags=None, env=None, config_file=None):
    return resolve_settings(flags or {}, env or {}, config_file)


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, repr(message)
    return message


# --- the key table and defaults --------------------------------------------------------------------


def test_every_settings_field_has_exactly_one_row_in_order():
    assert [key.name for key in KEYS] == [f.name for f in fields(Settings)]
    assert [key.default for key in KEYS] == [getattr(Settings(), f.name) for f in fields(Settings)]
    spellings = [flag for key in KEYS for flag in key.flags]
    assert len({key.env for key in KEYS}) == len(KEYS) and len(set(spellings)) == len(spellings)
    assert all(key.env.startswith("VOLUNTEER_") and key.flag.startswith("--") for key in KEYS)
    assert KEY_BY_NAME["experiment_file"].flag == "--experiment"
    assert KEY_BY_NAME["stats"].flags == ("--stats", "--no-stats") and KEY_BY_NAME["headless"].flags == ("--headless",)
    # --help shows it: one sentence each, without [...] that rich would take for markup and drop
    assert not [key.name for key in KEYS if not key.help.endswith(".") or "[" in key.help]


def readme_settings_rows() -> list[list[str]]:
    """The cells of the settings table in the README's "### Configuration" section."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Configuration", 1)[1].split("\n#", 1)[0]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| `")]


def test_the_readme_lists_every_setting_as_the_key_table_has_it():
    rows = readme_settings_rows()
    assert [row[0].strip("`") for row in rows] == [key.name for key in KEYS]
    for (_, env, flag, default), key in zip(rows, KEYS):
        assert re.findall(r"`([^`]+)`", env)[:1] == [key.env], key.name
        assert tuple(re.findall(r"`([^`]+)`", flag)) == key.flags, key.name
        # the value first, as config show prints it; what follows in parentheses only explains it
        assert default.split(" (")[0].strip("`") == key.show(key.default), key.name


def test_nothing_given_is_the_defaults_and_no_experiment_is_fine_until_start(config: Path):
    resolved = resolve(config_file=config)
    assert resolved.settings == Settings()
    assert set(resolved.sources.values()) == {"default"}
    assert not resolved.config_file_found and not config.exists()
    with pytest.raises(ValueError, match="--coordinator.*volunteer demo"):
        resolved.settings.require_experiment()


def test_the_default_file_is_volunteer_toml_in_the_config_dir(volunteer_home: Path):
    path = volunteer_home / "config" / "volunteer.toml"
    path.parent.mkdir(parents=True)
    path.write_text('power = "light"\n')
    resolved = resolve()
    assert resolved.config_file == path and resolved.config_file_found
    assert resolved.settings.power == "light" and resolved.sources["power"] == str(path)


def test_the_cli_keyword_call_still_builds_settings():
    settings = Settings(
        coordinator="http://127.0.0.1:1", experiment_file=None, initial_peers=(), host="127.0.0.1", port=0,
        announce_host=None, device="cpu", max_memory=0.5, max_experts=4, num_handlers=2, checkpoint_interval=60.0,
    )
    assert settings.require_experiment() is settings
    assert settings.power_level == POWER_LEVELS["full"] == (1.0, 1.0)
    with pytest.raises(TypeError):
        POWER_LEVELS["turbo"] = (2.0, 1.0)  # type: ignore[index]


# --- precedence: flag > env > file > default -------------------------------------------------------

# key, value in the file (TOML), in the environment (text), as a flag (typed), and what each means
PRECEDENCE = [
    ("port", 1111, "2222", 3333, (0, 1111, 2222, 3333)),
    ("max_memory", "8GiB", "0.25", "800MB", (None, 8 * 2**30, 0.25, 800 * 10**6)),
    ("power", "light", "medium", "full", ("full", "light", "medium", "full")),
    ("run_hours", "22-08", "0-24", "9-17", (None, "22-08", "0-24", "9-17")),
    ("pause_on_gpu_use", True, "no", True, (False, True, False, True)),
    ("stats", False, "yes", False, (True, False, True, False)),
    ("dashboard", False, "auto", True, (None, False, None, True)),
    ("cpu_threads", 2, "3", 4, (None, 2, 3, 4)),
    ("checkpoint_interval", 30, "45.5", 90.0, (60.0, 30.0, 45.5, 90.0)),
    ("initial_peers", ["/ip4/1.2.3.4/tcp/1/p2p/A"], "B,C D", ["E", "F,G"],
     ((), ("/ip4/1.2.3.4/tcp/1/p2p/A",), ("B", "C", "D"), ("E", "F", "G"))),
    ("max_temp", 80, "75.5", 70.0, (None, 80.0, 75.5, 70.0)),
]


@pytest.mark.parametrize("layers", [(f, e, g) for f in (0, 1) for e in (0, 1) for g in (0, 1)],
                         ids=lambda layers: "".join("feg"[i] if on else "-" for i, on in enumerate(layers)))
@pytest.mark.parametrize("key, in_file, in_env, as_flag, meanings", PRECEDENCE, ids=[row[0] for row in PRECEDENCE])
def test_the_highest_layer_given_wins_and_is_named(config, key, in_file, in_env, as_flag, meanings, layers):
    use_file, use_env, use_flag = layers
    config.write_text(to_toml({key: in_file}) if use_file else "")
    env = {KEY_BY_NAME[key].env: in_env} if use_env else {}
    flags = {key: as_flag} if use_flag else {}
    resolved = resolve(flags, env, config)
    winner = 3 if use_flag else 2 if use_env else 1 if use_file else 0
    assert getattr(resolved.settings, key) == meanings[winner]
    assert resolved.sources[key] == ["default", str(config), f"env {KEY_BY_NAME[key].env}",
                                     f"flag {KEY_BY_NAME[key].flag}"][winner]
    assert all(source == "default" for name, source in resolved.sources.items() if name != key)


def test_flags_given_as_none_are_not_given(config: Path):
    config.write_text("port = 5\n")
    resolved = resolve({"port": None, "device": None}, {}, config)
    assert resolved.settings.port == 5 and resolved.sources["port"] == str(config)


def test_an_empty_environment_variable_reads_as_unset(config: Path):
    config.write_text('device = "cpu"\n')
    assert resolve({}, {"VOLUNTEER_DEVICE": "  "}, config).settings.device == "cpu"


def test_a_relative_experiment_path_in_the_file_is_relative_to_the_file(config: Path):
    config.write_text('experiment_file = "exp.toml"\n')
    assert resolve({}, {}, config).settings.experiment_file == config.parent / "exp.toml"
    assert resolve({"experiment_file": Path("x.toml")}, {}, config).settings.experiment_file == Path("x.toml")


@pytest.mark.parametrize(
    "file, env, flags, kept, dropped",
    [
        ('coordinator = "http://c"\n', {}, {"experiment_file": Path("e.toml")}, "experiment_file", "coordinator"),
        ("", {"VOLUNTEER_COORDINATOR": "http://c"}, {"experiment_file": "e.toml"}, "experiment_file", "coordinator"),
        ('experiment_file = "/e.toml"\n', {"VOLUNTEER_COORDINATOR": "http://c"}, {}, "coordinator",
         "experiment_file"),
        ("headless = true\n", {}, {"dashboard": True}, "dashboard", "headless"),
    ],
)
def test_a_higher_layer_replaces_the_alternative_set_in_a_lower_one(config, file, env, flags, kept, dropped):
    config.write_text(file)
    resolved = resolve(flags, env, config)
    assert getattr(resolved.settings, kept)
    assert getattr(resolved.settings, dropped) == getattr(Settings(), dropped)
    assert resolved.sources[dropped].startswith("default; ") and "overridden by" in resolved.sources[dropped]


def test_alternatives_in_the_same_layer_are_a_conflict_naming_both(config: Path):
    config.write_text('coordinator = "http://c"\nexperiment_file = "/e.toml"\n')
    with pytest.raises(ConfigError) as info:
        resolve({}, {}, config)
    assert "coordinator" in one_line(info.value) and "experiment_file" in str(info.value)
    assert str(config) in str(info.value)


# --- bad input: one line naming where ---------------------------------------------------------------


@pytest.mark.parametrize(
    "document, expected",
    [
        ("prot = 1\n", "unknown key 'prot' (did you mean 'port'?)"),
        ("[server]\nport = 1\n", "unknown key 'server'"),
        ('port = "8080"\n', "port: expected an integer, got a string"),
        ("port = 1.5\n", "port: expected an integer"),
        ("stats = 1\n", "stats: expected true or false, got an integer"),
        ("initial_peers = [1, 2]\n", "initial_peers: expected a list of multiaddrs"),
        ("host = 2024-01-01\n", "host: expected a string, got a date"),
        ("port = \n", "not valid TOML"),
        ("a = 1\na = 2\n", "not valid TOML"),
        ('power = "x\n', "(at line 1"),
        ("\n\nport == 1\n", "(at line 3"),
        ("port = 70000\n", "port 70000 is not a TCP port"),
        ("port = -1\n", "port -1 is not a TCP port"),
        ('power = "turbo"\n', "power 'turbo' must be one of light, medium, full"),
        ('run_hours = "25-03"\n', "run_hours 25-3: hours are 0-23"),
        ('run_hours = "8-8"\n', "empty window"),
        ('run_hours = "evenings"\n', "run_hours 'evenings'"),
        ("max_temp = -5\n", "max_temp -5.0 must be between 20 and 120"),
        ("max_memory = 1.5\n", "max_memory = 1.5: a fraction must be at most 1"),
        ("max_memory = -0.5\n", "max_memory -0.5 must be a fraction"),
        ('max_memory = "lots"\n', "max_memory = 'lots': give a fraction"),
        ("max_experts = 0\n", "max_experts 0 must be at least 1"),
        ("cpu_threads = -2\n", "cpu_threads -2 must be between 1 and 4096"),
        ("checkpoint_interval = -1\n", "checkpoint_interval -1.0 must be a positive"),
        ("log_interval = nan\n", "log_interval nan must be a positive"),
        ("announce_interval = inf\n", "announce_interval inf must be a positive"),
        ("dashboard = \"sometimes\"\n", "dashboard: expected true, false or \"auto\""),
        ("headless = true\ndashboard = true\n", "headless and dashboard contradict"),
        ("port = " + "[" * 5000 + "\n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_key(config: Path, document: str, expected: str):
    config.write_text(document)
    with pytest.raises(ConfigError) as info:
        resolve({}, {}, config)
    message = one_line(info.value)
    assert message.startswith(f"{config}: ") and expected in message, message


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda p: p.write_bytes(b"# " + b"x" * MAX_CONFIG_BYTES + b"\n"), "larger than 64 KiB"),
        (lambda p: p.write_bytes(b'host = "\xff"\n'), "not UTF-8"),
        (lambda p: p.mkdir(), "not a regular file"),
        (lambda p: os.mkfifo(p), "not a regular file"),
    ],
    ids=["huge", "not-utf8", "directory", "fifo"],
)
def test_an_unusable_file_is_one_line_naming_it(config: Path, write, expected: str):
    write(config)
    with pytest.raises(ConfigError) as info:
        resolve({}, {}, config)
    assert one_line(info.value).startswith(f"{config}: ") and expected in str(info.value)


def test_a_path_through_a_file_is_one_line_naming_it(tmp_path: Path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="volunteer.toml: cannot read: Not a directory$"):
        resolve({}, {}, tmp_path / "file" / "volunteer.toml")


NOBODY = 65534  # uid and gid of "nobody": root reads any file whatever its mode, so as root the read drops to it


@pytest.fixture
def reachable_config() -> Iterator[Path]:
    """volunteer.toml in a folder under /tmp that any user may enter (pytest's tmp_path lies in an owner-only
    folder), so that a read as nobody fails on the file's own mode, not on the way to it."""
    with tempfile.TemporaryDirectory(prefix="vol-config-") as folder:
        os.chmod(folder, 0o755)
        yield Path(folder) / "volunteer.toml"


def config_error_unprivileged(config_file: Path) -> str | None:
    """The ConfigError's message (None: no error) for ``config_file``, read as this user or, when that is
    root, in a forked child that has dropped to nobody first; any other exception fails the test."""
    if os.geteuid() != 0:
        try:
            resolve({}, {}, config_file)
        except ConfigError as e:
            return str(e)
        return None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports on the pipe and always leaves through os._exit, never back into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                resolve({}, {}, config_file)
                report = {"error": None}
            except ConfigError as e:
                report = {"error": str(e)}
            os.write(write_end, json.dumps(report).encode())
        except BaseException as e:
            os.write(write_end, json.dumps({"unexpected": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b'{"unexpected": "the child wrote nothing"}')
    os.waitpid(pid, 0)
    assert "unexpected" not in report, report["unexpected"]
    return report["error"]


def test_an_unreadable_file_is_one_line_naming_it(reachable_config: Path):
    reachable_config.write_text("port = 1\n")
    assert config_error_unprivileged(reachable_config) is None, "the folder must be reachable, or the test proves nothing"
    reachable_config.chmod(0)
    message = config_error_unprivileged(reachable_config)
    assert message is not None and "\n" not in message, repr(message)
    assert message.startswith(f"{reachable_config}: ") and "cannot read: Permission denied" in message, message


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("VOLUNTEER_PORT", "abc", "env VOLUNTEER_PORT='abc': expected a whole number"),
        ("VOLUNTEER_PORT", "99999", "env VOLUNTEER_PORT: port 99999 is not a TCP port"),
        ("VOLUNTEER_STATS", "maybe", "env VOLUNTEER_STATS='maybe': expected one of 1/0"),
        ("VOLUNTEER_MAX_MEMORY", "1.5", "env VOLUNTEER_MAX_MEMORY='1.5': a fraction must be at most 1"),
        ("VOLUNTEER_MAX_TEMP", "hot", "env VOLUNTEER_MAX_TEMP='hot': expected a number"),
        ("VOLUNTEER_POWER", "max", "env VOLUNTEER_POWER: power 'max' must be one of"),
        ("VOLUNTEER_RUN_HOURS", "22-25", "env VOLUNTEER_RUN_HOURS: run_hours 22-25"),
        ("VOLUNTEER_NUM_HANDLERS", "0", "env VOLUNTEER_NUM_HANDLERS: num_handlers 0 must be between 1 and 256"),
    ],
)
def test_a_bad_environment_variable_is_one_line_naming_it(config: Path, name: str, text: str, expected: str):
    with pytest.raises(ConfigError) as info:
        resolve({}, {name: text}, config)
    assert expected in one_line(info.value), str(info.value)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"max_memory": "lots"}, "--max-memory 'lots': give a fraction like 0.5 or a size like 8GiB"),
        ({"port": 70000}, "flag --port: port 70000 is not a TCP port"),
        ({"power": "turbo"}, "flag --power: power 'turbo'"),
        ({"max_temp": -1.0}, "flag --max-temp: max_temp -1.0"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it(config: Path, flags: dict, expected: str):
    with pytest.raises(ConfigError) as info:
        resolve(flags, {}, config)
    assert expected in one_line(info.value), str(info.value)


def test_an_unknown_flag_name_is_a_bug_in_the_caller(config: Path):
    with pytest.raises(TypeError, match="'prot' is not a setting"):
        resolve({"prot": 1}, {}, config)


def test_unknown_volunteer_variables_are_ignored_with_a_warning(config: Path):
    env = {"VOLUNTEER_MAX_MEMROY": "1", "VOLUNTEER_HOME": "/x", "PATH": "/bin", "VOLUNTEERISH": "1"}
    resolved = resolve({}, env, config)
    assert resolved.settings == Settings()
    assert resolved.warnings == ("VOLUNTEER_MAX_MEMROY is not a setting; ignored (did you mean 'VOLUNTEER_MAX_MEMORY'?)",)


# --- the file is only read ------------------------------------------------------------------------------


def test_resolving_never_writes_the_file_or_creates_one(config: Path, tmp_path: Path):
    def snapshot():
        return config.read_bytes(), config.stat().st_mtime_ns, config.stat().st_mode, sorted(tmp_path.iterdir())

    for document in ('power = "medium"\nport = 70000\n', 'power = "medium"\n'):
        config.write_text(document)
        os.utime(config, ns=(1_000_000_000, 1_000_000_000))
        before = snapshot()
        try:
            resolved = resolve({"power": "light"}, {"VOLUNTEER_STATS": "0"}, config)
            resolved.format_table(), resolved.to_dict()
        except ConfigError:
            pass
        assert snapshot() == before
    missing = tmp_path / "nowhere" / "volunteer.toml"
    resolve({}, {}, missing)
    assert not missing.parent.exists()


# --- config show ----------------------------------------------------------------------------------------


def test_the_table_has_one_line_per_setting_with_its_source(config: Path):
    config.write_text('power = "light"\nmax_memory = "8GiB"\n')
    resolved = resolve({"port": 4000}, {"VOLUNTEER_DEVICE": "cpu"}, config)
    lines = resolved.format_table().splitlines()
    assert lines[0] == f"# config file: {config}"
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == [key.name for key in KEYS]
    assert rows["power"].endswith(f'= "light"  ({config})')
    assert rows["max_memory"].endswith(f'= "8GiB"  ({config})')
    assert rows["device"].endswith('= "cpu"  (env VOLUNTEER_DEVICE)')
    assert rows["port"].endswith("= 4000  (flag --port)")
    assert rows["dashboard"].endswith("= auto  (default)")
    assert "not found" in resolve({}, {}, config.with_name("none.toml")).format_table().splitlines()[0]


def test_to_dict_is_json_with_values_and_sources(config: Path):
    resolved = resolve({"experiment_file": Path("/e.toml"), "initial_peers": ["a,b"]}, {}, config)
    data = json.loads(json.dumps(resolved.to_dict()))
    assert data["settings"]["experiment_file"] == "/e.toml" and data["settings"]["initial_peers"] == ["a", "b"]
    assert data["sources"]["initial_peers"] == "flag --initial-peers" and data["sources"]["port"] == "default"
    assert data["config_file"] == str(config) and data["config_file_found"] is False


# --- memory sizes: the CLI's semantics --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("0.5", 0.5), ("1", 1.0), ("8GiB", 8 * 2**30), ("800MB", 800 * 10**6), ("2000000000", 2_000_000_000),
     (" 12 kib ", 12 * 1024), ("1B", 1), (None, None)],
)
def test_parse_memory_accepts_fractions_and_sizes(text, expected):
    value = parse_memory(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["1.5", "lots", "-1", "8 parsecs", "", "1e9"])
def test_parse_memory_rejects_ambiguous_or_bad_values(text):
    with pytest.raises(ValueError, match="^--max-memory "):
        parse_memory(text)


@given(st.integers(min_value=1, max_value=2**50))
def test_bytes_are_shown_as_sizes_that_read_back_to_the_same_number(value: int):
    shown = format_memory(value)
    assert isinstance(shown, str) and parse_memory(shown) == value
    assert format_memory(0.5) == 0.5 and format_memory(8 * 2**30) == "8GiB" and format_memory(1000) == "1000B"


# --- properties over documents built from the key table ------------------------------------------------

HOURS = st.tuples(st.integers(0, 23), st.integers(0, 24)).filter(lambda h: h[0] != h[1])
VALID = {
    "coordinator": st.sampled_from(["http://127.0.0.1:8470", "https://c.example.org"]),
    "initial_peers": st.lists(st.text(string.ascii_letters + "/0123456789", min_size=1, max_size=8), max_size=3),
    "host": st.sampled_from(["0.0.0.0", "127.0.0.1", "::"]),
    "port": st.integers(0, 65535),
    "announce_host": st.sampled_from(["203.0.113.7", "volunteer.example.org"]),
    "dial_trainers": st.booleans(),
    "startup_timeout": st.floats(min_value=1e-3, max_value=1e6),
    "device": st.sampled_from(["cpu", "cuda", "cuda:1"]),
    "gpus": st.sampled_from(["0", "0,2", "GPU-8f1e", "1, 3"]),
    "max_memory": st.one_of(st.floats(min_value=1e-6, max_value=1.0), st.integers(2, 2**50),
                            st.sampled_from(["8GiB", "800MB", "0.5", "12KiB"])),
    "max_experts": st.integers(1, 10**6),
    "num_handlers": st.integers(1, 256),
    "checkpoint_interval": st.floats(min_value=1e-3, max_value=1e6),
    "announce_interval": st.integers(1, 3600),
    "headless": st.booleans(),
    "log_interval": st.floats(min_value=1e-3, max_value=1e6),
    "cpu_threads": st.integers(1, 4096),
    "power": st.sampled_from(sorted(POWER_LEVELS)),
    "serving": st.sampled_from(["lean", "hivemind"]),
    "max_temp": st.floats(min_value=20, max_value=120),
    "run_hours": HOURS.map(lambda h: f"{h[0]}-{h[1]}"),
    "pause_on_gpu_use": st.booleans(),
    "stats": st.booleans(),
    "dashboard": st.one_of(st.booleans(), st.just("auto")),
    "remeasure": st.booleans(),
    "rebalance_period": st.floats(min_value=0, max_value=1e6),
}


SCALARS = st.one_of(
    st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["light", "full", "22-08", "0-24", "8GiB", "0.5", "auto", "cpu", "http://c", "a,b"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=3), SCALARS, max_size=2))
NAMES = st.one_of(st.sampled_from([key.name for key in KEYS]), st.text(max_size=8))


@st.composite
def fuzzed_documents(draw) -> dict:
    """Mostly plausible values, so that some documents get past parsing into Settings' checks."""
    names = draw(st.lists(NAMES, max_size=6, unique=True))
    return {name: draw(st.one_of(VALID[name], VALUES) if name in VALID else VALUES) for name in names}


@FAST
@given(fuzzed_documents())
def test_any_document_resolves_or_is_a_config_error(tmp_path: Path, document: dict):
    path = tmp_path / "fuzz.toml"
    path.write_text(to_toml(document), encoding="utf-8")
    try:
        resolved = resolve({}, {}, path)
    except ConfigError as e:
        one_line(e)
        return
    assert set(document) <= set(KEY_BY_NAME) and resolved.config_file_found


@FAST
@given(st.text(max_size=200))
def test_any_text_resolves_or_is_a_config_error(tmp_path: Path, text: str):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        resolve({}, {}, path)
    except ConfigError as e:
        one_line(e)


@FAST
@given(st.dictionaries(st.sampled_from([key.env for key in KEYS]), st.one_of(
    st.text(max_size=10), st.sampled_from(["1", "no", "auto", "0.5", "8GiB", "22-08", "medium", "-3", "1e999"]))))
def test_any_environment_resolves_or_is_a_config_error(tmp_path: Path, env: dict):
    try:
        resolve({}, env, tmp_path / "absent.toml")
    except ConfigError as e:
        one_line(e)


@st.composite
def valid_documents(draw) -> dict:
    names = draw(st.sets(st.sampled_from(list(VALID))))
    document = {name: draw(VALID[name]) for name in sorted(names)}
    document.pop("experiment_file", None)
    if "coordinator" in document:
        document["experiment_file"] = None
    if document.get("headless"):
        document.pop("dashboard", None)
    return {k: v for k, v in document.items() if v is not None}


def test_the_valid_strategies_cover_every_setting_but_the_experiment_file():
    assert set(VALID) | {"experiment_file"} == set(KEY_BY_NAME)


@FAST
@given(valid_documents(), st.sampled_from(["file", "flags"]))
def test_settings_shown_by_to_dict_and_written_back_resolve_the_same(tmp_path: Path, document: dict, via: str):
    first_file, second_file = tmp_path / "first.toml", tmp_path / "second.toml"
    first_file.write_text(to_toml(document) if via == "file" else "")
    flags = {k: (None if v == "auto" else v) for k, v in document.items()} if via == "flags" else {}
    first = resolve(flags, {}, first_file)
    shown = first.to_dict()["settings"]
    second_file.write_text(to_toml({k: v for k, v in shown.items() if v is not None}))
    second = resolve({}, {}, second_file).settings
    assert second == first.settings
    # == alone would let 1.0 (a fraction) pass for 1 (one byte)
    assert [type(getattr(second, f.name)) for f in fields(Settings)] == [
        type(getattr(first.settings, f.name)) for f in fields(Settings)]


# --- run hours ----------------------------------------------------------------------------------------------


def brute_force_hours(start: int, end: int) -> set[int]:
    hours, hour = set(), start
    while hour % 24 != end % 24 or not hours:
        hours.add(hour % 24)
        hour += 1
    return hours


@given(HOURS)
def test_run_hours_contain_exactly_the_hours_from_start_up_to_end(hours):
    window = RunHours.parse(f"{hours[0]}-{hours[1]}")
    assert {h for h in range(24) if window.contains(h)} == brute_force_hours(*hours)
    assert RunHours.parse(str(window)) == window


@given(HOURS, st.datetimes())
def test_run_hours_judge_times_and_datetimes_by_their_hour(hours, when: datetime):
    window = RunHours(*hours)
    assert window.contains(when) == window.contains(when.time()) == window.contains(when.hour)


def test_run_hours_wrap_past_midnight():
    night = RunHours.parse("22-08")
    assert night.contains(23) and night.contains(0) and night.contains(7) and not night.contains(8)
    assert not night.contains(time(12, 30)) and night.contains(time(22, 0))
    assert all(RunHours.parse("0-24").contains(h) for h in range(24))


@given(st.integers(-100, 100), st.integers(-100, 100))
def test_run_hours_outside_the_clock_are_refused(start: int, end: int):
    valid = 0 <= start <= 23 and 0 <= end <= 24 and start != end
    try:
        RunHours(start, end)
    except ValueError as e:
        assert not valid and "run_hours" in str(e)
    else:
        assert valid


def test_dashboard_auto_follows_the_terminal():
    assert Settings().show_dashboard(True) and not Settings().show_dashboard(False)
    assert not Settings(headless=True).show_dashboard(True)
    assert Settings(dashboard=True).show_dashboard(False)
    assert math.isclose(Settings(power="light").power_level.duty_cycle, 0.3)


def test_a_path_at_an_unknown_users_home_is_a_config_error(tmp_path: Path):
    # found by hypothesis: Path("~0").expanduser() raises RuntimeError, which crashed start
    with pytest.raises(ConfigError, match="cannot expand '~0': no such user") as info:
        resolve({}, {"VOLUNTEER_EXPERIMENT_FILE": "~0/exp.toml"}, tmp_path / "none.toml")
    one_line(info.value)
