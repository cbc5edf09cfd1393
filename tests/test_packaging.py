"""The install path a volunteer takes: the wheel, a pipx install of it, the systemd units, cloud-init.

The package is not on PyPI, so every install line in the repository names a checkout or the wheel
`make wheel` builds; the units and the cloud-init file are checked by the tools that read them
(`systemd-analyze verify`, `cloud-init schema` where installed) rather than by eye.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
SYSTEM_UNIT = PACKAGING / "hivemind-volunteer.service"
USER_UNIT = PACKAGING / "volunteer.service"
CLOUD_INIT = PACKAGING / "cloud-init.yaml"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]

# An install of this project by name from a package index: pip or pipx, any options, then the name
# (a wheel's file name has an underscore, so installs of a built wheel do not match).
INSTALL_BY_NAME = re.compile(r"\bpipx?\s+install\s+(?:-\S+\s+)*hivemind-volunteer(?![\w.-])")
SKIPPED_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}


def repository_texts() -> list[tuple[Path, str]]:
    """Every text file of the checkout, outside build outputs and virtual environments."""
    texts = []
    for path in sorted(ROOT.rglob("*")):
        parts = set(path.relative_to(ROOT).parts)
        if not path.is_file() or parts & SKIPPED_DIRS or any(p.endswith(".egg-info") for p in parts):
            continue
        try:
            texts.append((path, path.read_text()))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def test_no_file_installs_the_package_by_name_from_an_index() -> None:
    # hivemind-volunteer has no release on PyPI: such a line fails for a new user (issue 15.1).
    claims = [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
              for path, text in repository_texts() for m in INSTALL_BY_NAME.finditer(text)]
    assert not claims, "installs from a package index that has no release:\n" + "\n".join(claims)


def test_the_pattern_catches_the_claims_it_is_for() -> None:
    name = "hivemind" + "-volunteer"
    for line in (f"pipx install {name}", f"sudo -u v pipx install --force {name}", f"pip install {name}\n"):
        assert INSTALL_BY_NAME.search(line), line
    for line in ("pipx install ./dist/hivemind_volunteer-0.1.0-py3-none-any.whl", "pipx install .",
                 f"pipx uninstall {name}", f"pipx install {name}-extras"):
        assert not INSTALL_BY_NAME.search(line), line


def test_pyproject_uses_an_spdx_license_and_admits_the_tested_torch() -> None:
    # A license table prints setuptools' deprecation block three times a build (issue 15.11).
    assert PYPROJECT["project"]["license"] == "MIT"
    setuptools = next(Requirement(r) for r in PYPROJECT["build-system"]["requires"]
                      if Requirement(r).name == "setuptools")
    assert not setuptools.specifier.contains("76.2") and setuptools.specifier.contains("77.0")
    torch = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "torch")
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.13.0+cpu")


def test_every_torch_install_takes_the_cpu_index_without_a_gpu() -> None:
    # PyPI's Linux torch is the CUDA build: a CPU box that installs from it downloads gigabytes.
    script = cloud_init_file("/usr/local/sbin/install-hivemind-volunteer")
    for name, text in (("Makefile", (ROOT / "Makefile").read_text()),
                       ("packaging/Containerfile", (PACKAGING / "Containerfile").read_text()),
                       ("the cloud-init install script", script)):
        assert CPU_INDEX in text, name
        assert "torch==2.13.0" in text, name
    assert "nvidia-smi" in script and "nvidia-smi" in (ROOT / "Makefile").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel `make wheel` builds (its pip command, into a temporary folder), and pip's verbose log."""
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(out), str(ROOT)],
                           capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (whl,) = out.glob("hivemind_volunteer-*.whl")
    return whl, build.stdout + build.stderr


@pytest.mark.integration
def test_the_wheel_holds_the_package_data_and_builds_without_deprecations(wheel: tuple[Path, str]) -> None:
    whl, log = wheel
    assert "project.license" not in log, "setuptools warns about the license field again"
    with zipfile.ZipFile(whl) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"hivemind_volunteer-{VERSION}.dist-info/METADATA").decode()
        scripts = archive.read(f"hivemind_volunteer-{VERSION}.dist-info/entry_points.txt").decode()
    assert "volunteer/experiments/default.toml" in names
    assert not any(n.startswith("tests/") for n in names)
    assert "License-Expression: MIT" in metadata
    assert "volunteer = volunteer.cli:main" in scripts and "coordinator-seed = coordinator_seeds.cli:main" in scripts


def without_python_path(**extra: str) -> dict[str, str]:
    """This environment minus PYTHONPATH and VOLUNTEER_*: an installed program must not find the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("VOLUNTEER_")}
    return env | extra


@pytest.fixture(scope="module")
def pipx_install(wheel: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel installed with pipx, PIPX_HOME and PIPX_BIN_DIR in a temporary folder.

    What is reused, and why: torch (over a GB installed; from PyPI, the CUDA build) and the wheel's
    other dependencies are not fetched again. The venv pipx installs into is made first with a .pth
    file that appends this test environment's site-packages to its path; `pipx install --force` then
    installs into that venv (--force: into the existing one) the wheel alone (--no-deps). What this
    checks is the wheel itself: its modules, package data and console scripts, run from the pipx venv
    without PYTHONPATH; `pip check` there checks the wheel's requirements against what is reused.
    """
    root = tmp_path_factory.mktemp("pipx")
    dirs = {"home": root / "home", "bin": root / "bin", "man": root / "man"}
    env = without_python_path(PIPX_HOME=str(dirs["home"]), PIPX_BIN_DIR=str(dirs["bin"]),
                              PIPX_MAN_DIR=str(dirs["man"]), PIPX_DEFAULT_PYTHON=sys.executable)
    import pipx  # the test extra has it; where it lies outside this venv, pipx's process must find it

    pipx_dir = str(Path(pipx.__file__).resolve().parent.parent)
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    if pipx_dir not in ours:
        env["PYTHONPATH"] = pipx_dir  # pipx itself drops PYTHONPATH for the venvs it runs
    venv = dirs["home"] / "venvs" / "hivemind-volunteer"
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], env=without_python_path(), check=True, timeout=120)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          env=without_python_path(), capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_reuse_test_environment.pth").write_text("\n".join(ours) + "\n")

    install = subprocess.run([sys.executable, "-m", "pipx", "install", "--force", "--pip-args=--no-deps",
                              str(wheel[0])], env=env, capture_output=True, text=True, timeout=240)
    assert install.returncode == 0, install.stdout + install.stderr
    return dirs | {"venv": venv, "python": python, "pipx_env": env}  # type: ignore[dict-item]


def run_installed(pipx_install: dict[str, Path], program: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    command = [str(pipx_install["bin"] / program), *args]
    return subprocess.run(command, env=without_python_path(VOLUNTEER_HOME=str(home)), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=home)


@pytest.mark.integration
def test_the_pipx_install_runs_the_wheels_code_and_its_console_scripts(pipx_install: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    where = subprocess.run([pipx_install["python"], "-c", "import volunteer, coordinator_seeds as c; "
                            "print(volunteer.__file__); print(c.__file__)"],
                           env=without_python_path(), capture_output=True, text=True, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(pipx_install["venv"]), f"imported from outside the pipx venv: {line}"

    version = run_installed(pipx_install, "volunteer", "--version", home=tmp_path)
    assert version.returncode == 0 and VERSION in version.stdout, version.stdout + version.stderr
    hardware = run_installed(pipx_install, "volunteer", "hardware", "--json", home=tmp_path)
    assert hardware.returncode == 0, hardware.stderr
    assert isinstance(json.loads(hardware.stdout), dict)
    seed = run_installed(pipx_install, "coordinator-seed", "--help", home=tmp_path)
    assert seed.returncode == 0 and "run" in seed.stdout, seed.stdout + seed.stderr

    check = subprocess.run([sys.executable, "-m", "pipx", "runpip", "hivemind-volunteer", "check"],
                           env=pipx_install["pipx_env"], capture_output=True, text=True, timeout=120)
    unmet = [line for line in check.stdout.splitlines() if line.lower().startswith("hivemind-volunteer ")]
    assert not unmet, check.stdout


def unit_for_verify(unit: Path, executable: Path, folder: Path) -> Path:
    """A copy of ``unit`` whose ExecStart runs ``executable`` (verify wants a program that exists)."""
    text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={executable}", unit.read_text(), flags=re.M)
    assert count == 1
    copy = folder / unit.name
    copy.write_text(text)
    return copy


@pytest.mark.integration
@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=lambda p: p.name)
def test_systemd_analyze_verify_accepts_the_unit(unit: Path, pipx_install: dict[str, Path], tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs it)")
    copy = unit_for_verify(unit, pipx_install["bin"] / "volunteer", tmp_path)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    scope = ["--user"] if unit == USER_UNIT else []
    verify = subprocess.run([analyze, *scope, "verify", str(copy)], capture_output=True, text=True, timeout=60,
                            env=os.environ | {"XDG_RUNTIME_DIR": str(runtime)})
    # verify exits 0 on unknown keys and bad values too, so any line about this unit fails the test
    complaints = [line for line in (verify.stdout + verify.stderr).splitlines() if unit.name in line]
    assert verify.returncode == 0 and not complaints, verify.stdout + verify.stderr


def test_the_units_restart_on_failure_but_not_without_a_configuration() -> None:
    # exit 2 is "nothing or something invalid configured": restarting every 10 s cannot help (issue 15.3)
    for unit in (SYSTEM_UNIT, USER_UNIT):
        text = unit.read_text()
        for line in ("Restart=on-failure", "RestartPreventExitStatus=2", "KillSignal=SIGTERM"):
            assert re.search(rf"^{line}$", text, re.M), (unit.name, line)
        assert re.search(r"^ExecStart=\S+/volunteer start --headless$", text, re.M), unit.name
    assert "loginctl enable-linger" in USER_UNIT.read_text()
    system = SYSTEM_UNIT.read_text()
    for line in ("User=hivemind-volunteer", "StateDirectory=hivemind-volunteer",
                 "Environment=VOLUNTEER_HOME=/var/lib/hivemind-volunteer", "ProtectSystem=strict",
                 "ProtectHome=yes", "NoNewPrivileges=yes", "PrivateTmp=yes"):
        assert re.search(rf"^{line}$", system, re.M), line
    assert not re.search(r"^(PrivateDevices|DevicePolicy|DeviceAllow)=", system, re.M), "the GPU must stay reachable"


def cloud_config() -> dict:
    text = CLOUD_INIT.read_text()
    assert text.startswith("#cloud-config\n")
    config = yaml.safe_load(text)
    assert isinstance(config, dict)
    return config


def cloud_init_file(path: str) -> str:
    (entry,) = [f for f in cloud_config()["write_files"] if f["path"] == path]
    return entry["content"]


# The cloud-config keys this file may use; cloud-init ignores unknown top-level keys (a typo would pass).
CLOUD_CONFIG_KEYS = {"package_update", "package_upgrade", "packages", "users", "groups", "write_files",
                     "runcmd", "bootcmd", "timezone", "ssh_authorized_keys"}


def test_cloud_init_keeps_the_default_user_and_installs_the_system_unit(tmp_path: Path) -> None:
    config = cloud_config()
    assert set(config) <= CLOUD_CONFIG_KEYS, set(config) - CLOUD_CONFIG_KEYS
    # without "default" the image's user, and with it the provider's SSH keys, is gone (issue 15.3)
    assert config["users"][0] == "default"
    (service_user,) = [u for u in config["users"][1:] if u["name"] == "hivemind-volunteer"]
    assert service_user["system"] is True and service_user["shell"] == "/usr/sbin/nologin"
    assert {"python3", "python3-venv"} <= set(config["packages"])
    assert cloud_init_file("/etc/systemd/system/hivemind-volunteer.service") == SYSTEM_UNIT.read_text()
    assert re.search(r"^VOLUNTEER_COORDINATOR=\S+$", cloud_init_file("/etc/hivemind-volunteer/env"), re.M)

    script = cloud_init_file("/usr/local/sbin/install-hivemind-volunteer")
    assert config["runcmd"] == [["/usr/local/sbin/install-hivemind-volunteer"]]
    assert script.startswith("#!/bin/sh\n") and "\nset -eu\n" in script
    assert re.search(r"^WHEEL_URL=https://REPLACE-ME\.\S+\.whl$", script, re.M), "the placeholder is marked"
    assert script.rstrip().endswith("systemctl enable --now hivemind-volunteer.service")
    (tmp_path / "install").write_text(script)
    syntax = subprocess.run(["sh", "-n", str(tmp_path / "install")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_cloud_init_schema_accepts_the_file() -> None:
    cloud_init = shutil.which("cloud-init")
    if cloud_init is None:
        pytest.skip("cloud-init is not installed (.ci/run installs it); the key checks above still ran")
    schema = subprocess.run([cloud_init, "schema", "--config-file", str(CLOUD_INIT)], capture_output=True,
                            text=True, timeout=120)
    assert schema.returncode == 0, schema.stdout + schema.stderr
