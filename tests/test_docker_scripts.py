"""The Docker image's install and entry steps, exercised without Docker.

The Dockerfile only calls docker/install.sh and the entrypoint it installs, so
running those scripts here (install into a temp venv, serve from it on a
loopback port) tests what the image does. The Dockerfile itself is checked
statically so it cannot drift away from the scripts.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacifica_like.devserver import RunningServer, free_port, run_server

REPO = Path(__file__).resolve().parent.parent
INSTALL_SH = REPO / "docker" / "install.sh"
ENTRYPOINT_SH = REPO / "docker" / "entrypoint.sh"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

IMAGE_VENV = "/opt/pacifica-like"
ENTRY_IN_VENV = "docker/entrypoint.sh"  # where install.sh puts the entrypoint
HEALTH = {"message": "Pacifica Archive Interface Up and Running"}
LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"
INSTALL_TIMEOUT = 900  # a cold uWSGI compile; pip's wheel cache makes repeats take seconds

# The first test that needs the venv pays for the install inside its own timeout.
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 120)


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without PAI_* settings, plus ``overrides``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PAI_")}
    return {**env, **overrides}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return the instructions from the last FROM on: what the image runs."""
    starts = [index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1] :]


def arguments_of(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    """Return the arguments of every ``keyword`` instruction, in order."""
    return [arguments for name, arguments in instructions if name == keyword]


def http(method: str, url: str, body: bytes | None = None, **headers: str) -> tuple[int, bytes]:
    """Send one request; return the status and body, errors included."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@dataclass(frozen=True)
class Installed:
    """A venv made by docker/install.sh, as the image's build stage makes it."""

    venv: Path
    seconds: float

    @property
    def entrypoint(self) -> Path:
        """The entrypoint copy the image's ENTRYPOINT runs."""
        return self.venv / ENTRY_IN_VENV

    def run_entrypoint(self, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
        """Run the entrypoint to completion (for commands that exit)."""
        return subprocess.run(
            [str(self.entrypoint), *args],
            cwd=cwd,
            env=clean_env(**env),
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Install the project into a fresh venv with docker/install.sh, once per session."""
    root = tmp_path_factory.mktemp("image")
    venv = root / "venv"
    log = root / "install.log"
    started = time.monotonic()
    with log.open("w") as output:
        result = subprocess.run(
            [str(INSTALL_SH), str(REPO)],
            cwd=root,
            env=clean_env(PAI_VENV=str(venv), PAI_PYTHON=sys.executable),
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=INSTALL_TIMEOUT,
        )
    seconds = time.monotonic() - started
    if result.returncode != 0:
        pytest.fail(f"install.sh exited {result.returncode}:\n{log.read_text()[-5000:]}")
    print(f"\ndocker/install.sh took {seconds:.1f} s", file=sys.stderr)
    return Installed(venv, seconds)


@dataclass(frozen=True)
class Served:
    """The entrypoint serving over loopback, and its data directory."""

    server: RunningServer
    data: Path
    port: int


@pytest.fixture(scope="module")
def served(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Run the installed entrypoint (uWSGI) on a free port over a not-yet-created data dir."""
    root = tmp_path_factory.mktemp("served")
    data = root / "data"
    port = free_port()
    env = {"PAI_LISTEN": f"127.0.0.1:{port}", "PAI_PREFIX": str(data), "PAI_PROCESSES": "2"}
    with pytest.MonkeyPatch.context() as patch:
        # run_server layers env over os.environ; no stray PAI_* may leak in.
        for key in [key for key in os.environ if key.startswith("PAI_")]:
            patch.delenv(key)
        patch.chdir(root)
        command = [str(installed.entrypoint)]
        with run_server(command, port, env, log_path=str(root / "server.log"), timeout=60) as server:
            yield Served(server, data, port)


# --- the Dockerfile, statically -------------------------------------------------------------


def test_every_stage_builds_from_python_311_slim() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    bases = [arguments.split()[0] for arguments in arguments_of(instructions, "FROM")]
    assert bases, "no FROM line"
    assert all(base == "python:3.11-slim" for base in bases), bases


def test_image_runs_as_a_created_non_root_user_with_a_data_volume() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    users = arguments_of(stage, "USER")
    assert users, "the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any("useradd" in run and user in run for run in arguments_of(stage, "RUN"))
    assert any("/data" in volume for volume in arguments_of(stage, "VOLUME"))
    assert any("8080" in ports.split() for ports in arguments_of(stage, "EXPOSE"))


def test_image_installs_and_enters_through_the_tested_scripts() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    installs = [run for run in arguments_of(instructions, "RUN") if "docker/install.sh" in run]
    assert installs, "the Dockerfile does not run docker/install.sh"
    assert f"PAI_VENV={IMAGE_VENV}" in installs[0]
    stage = final_stage(instructions)
    assert any(IMAGE_VENV in copy and "--from=" in copy for copy in arguments_of(stage, "COPY"))
    entrypoints = arguments_of(stage, "ENTRYPOINT")
    assert entrypoints
    assert json.loads(entrypoints[-1]) == [f"{IMAGE_VENV}/{ENTRY_IN_VENV}"]


def test_healthcheck_uses_the_venv_python_without_curl() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    healthchecks = arguments_of(stage, "HEALTHCHECK")
    assert healthchecks
    command = json.loads(healthchecks[-1].partition("CMD")[2])
    assert command[:2] == [f"{IMAGE_VENV}/bin/python", "-c"]
    assert "urllib" in command[2]
    assert "127.0.0.1" in command[2]


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    for needed in (".venv", ".git", "archive-data", "bench/.peer-venv"):
        assert needed in patterns, needed
    assert patterns & {"__pycache__", "**/__pycache__"}


@pytest.mark.parametrize("script", [INSTALL_SH, ENTRYPOINT_SH], ids=lambda path: path.name)
def test_scripts_are_strict_executable_bash(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert script.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        checked = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout


# --- install.sh ---------------------------------------------------------------------------


@pytest.mark.live
def test_install_makes_a_self_contained_venv(installed: Installed, tmp_path: Path) -> None:
    assert installed.entrypoint.read_bytes() == ENTRYPOINT_SH.read_bytes()
    assert installed.entrypoint.stat().st_mode & stat.S_IXUSR
    version = subprocess.run(
        [str(installed.venv / "bin" / "uwsgi"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip()
    # A real install, not the checkout: the package imports from the venv's site-packages.
    where = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", "import pacifica_like; print(pacifica_like.__file__)"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(installed.venv)


# --- entrypoint.sh serving ------------------------------------------------------------------


@pytest.mark.live
def test_entrypoint_serves_the_health_message_and_creates_the_data_dir(served: Served) -> None:
    status, body = http("GET", served.server.url + "/")
    assert status == 200
    assert json.loads(body) == HEALTH
    assert served.data.is_dir()
    assert not list(served.data.glob(".entrypoint-probe*"))


@pytest.mark.live
def test_entrypoint_stores_and_returns_a_file(served: Served) -> None:
    payload = b"archived through the image entrypoint\n" * 100
    status, body = http("PUT", served.server.url + "/12345", payload, **{"Last-Modified": LAST_MODIFIED})
    assert status == 201, body
    assert json.loads(body)["total_bytes"] == len(payload)
    status, body = http("GET", served.server.url + "/12345")
    assert status == 200
    assert body == payload
    assert (served.data / "39" / "3039").read_bytes() == payload


@pytest.mark.live
def test_entrypoint_serves_probes_and_logs_each_request_once_as_json(served: Served) -> None:
    status, body = http("GET", served.server.url + "/ready")
    assert (status, json.loads(body)["status"]) == (200, "ready")
    status, body = http("GET", served.server.url + "/metrics")
    assert status == 200 and b"pacifica_like_http_requests_total" in body
    http("GET", served.server.url + "/424242")
    # Our JSON access line, and no uWSGI request line ("GET /424242 => generated ...") beside it.
    time.sleep(0.2)
    mentions = [line for line in served.server.log().splitlines() if "/424242" in line]
    assert len(mentions) == 1 and json.loads(mentions[0])["status"] == 404, mentions


@pytest.mark.live
def test_dockerfile_healthcheck_passes_only_while_the_server_answers(
    installed: Installed, served: Served
) -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    command = json.loads(arguments_of(stage, "HEALTHCHECK")[-1].partition("CMD")[2])
    command[0] = str(installed.venv / "bin" / "python")
    healthy = subprocess.run(
        command, env=clean_env(PAI_LISTEN=f"127.0.0.1:{served.port}"), capture_output=True, timeout=30
    )
    assert healthy.returncode == 0, healthy.stderr
    nobody = subprocess.run(
        command, env=clean_env(PAI_LISTEN=f":{free_port()}"), capture_output=True, timeout=30
    )
    assert nobody.returncode != 0


# --- entrypoint.sh failing fast and running sub-commands -----------------------------------


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A directory the current user cannot create files in."""
    if os.geteuid() == 0:
        # Root ignores mode bits, but procfs refuses new files even to root.
        yield Path("/proc")
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    yield locked
    locked.chmod(0o755)  # so pytest can clean up


@pytest.mark.live
def test_entrypoint_refuses_a_data_dir_whose_parent_is_missing(installed: Installed, tmp_path: Path) -> None:
    data = tmp_path / "not-mounted" / "data"
    started = time.monotonic()
    result = installed.run_entrypoint(cwd=tmp_path, PAI_PREFIX=str(data))
    assert result.returncode != 0
    assert time.monotonic() - started < 30
    assert f"parent {data.parent} does not exist" in result.stderr
    assert not data.parent.exists()


@pytest.mark.live
@pytest.mark.parametrize("leaf", [False, True], ids=["existing-dir", "uncreatable-leaf"])
def test_entrypoint_refuses_an_unwritable_data_dir(
    installed: Installed, unwritable: Path, tmp_path: Path, leaf: bool
) -> None:
    data = unwritable / "pacifica-like-data" if leaf else unwritable
    result = installed.run_entrypoint(cwd=tmp_path, PAI_PREFIX=str(data))
    assert result.returncode != 0
    assert str(data) in result.stderr
    assert "not writable" in result.stderr
    # The banner is printed just before exec'ing uWSGI: the checks stopped it first.
    assert "uWSGI on" not in result.stderr


@pytest.mark.live
def test_entrypoint_passes_options_through_to_uwsgi(installed: Installed, tmp_path: Path) -> None:
    result = installed.run_entrypoint("--version", cwd=tmp_path, PAI_PREFIX=str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    uwsgi = subprocess.run(
        [str(installed.venv / "bin" / "uwsgi"), "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout == uwsgi.stdout


@pytest.mark.live
@pytest.mark.parametrize("spelled_out", [False, True], ids=["check-config", "pacifica-like-check-config"])
def test_check_config_prints_the_image_defaults(
    installed: Installed, tmp_path: Path, spelled_out: bool
) -> None:
    args = ["pacifica-like", "check-config"] if spelled_out else ["check-config"]
    result = installed.run_entrypoint(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[archive] backend = posix" in result.stdout
    assert "[archive] prefix = /data " in result.stdout
    assert not (tmp_path / "archive-data").exists()


@pytest.mark.live
def test_check_config_keeps_the_prefix_archive_ini_names(installed: Installed, tmp_path: Path) -> None:
    ini = tmp_path / "archive.ini"
    ini.write_text(f"[archive]\nprefix = {tmp_path / 'from-ini'}\nwrite_once = true\n")
    result = installed.run_entrypoint("check-config", cwd=tmp_path, PAI_CONFIG=str(ini))
    assert result.returncode == 0, result.stderr
    assert f"[archive] prefix = {tmp_path / 'from-ini'}    ({ini} [archive] prefix)" in result.stdout
    assert "[archive] write_once = True" in result.stdout
    assert "[archive] backend = posix" in result.stdout


@pytest.mark.live
def test_entrypoint_stops_on_a_bad_archive_ini(installed: Installed, tmp_path: Path) -> None:
    ini = tmp_path / "archive.ini"
    ini.write_text("[archive]\nno_such_key = 1\n")
    result = installed.run_entrypoint(cwd=tmp_path, PAI_CONFIG=str(ini))
    assert result.returncode != 0
    assert f"{ini} [archive] no_such_key: unknown key" in result.stderr


def workers_under(pid: int) -> list[str]:
    """Return the command lines of `pacifica-like worker` processes descending from ``pid``."""
    children: dict[int, list[int]] = {}
    commands: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                commands[int(entry)] = handle.read().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            argv = commands.get(child, [])
            if any(a.endswith("/pacifica-like") and b == "worker" for a, b in itertools.pairwise(argv)):
                found.append(" ".join(argv))
    return found


@pytest.mark.live
def test_entrypoint_runs_the_recall_scheduler_beside_uwsgi_only_for_tape(
    installed: Installed, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert workers_under(served.server.process.pid) == []  # posix: nothing to recall
    library = tmp_path / "library"
    env = {
        "PAI_BACKEND_TYPE": "tape",
        "PAI_PREFIX": str(tmp_path / "data"),
        "PAI_TAPE_LIBRARY": str(library),
        "PAI_TAPE_TIME_SCALE": "0",
    }
    initialised = installed.run_entrypoint("tape", "init", cwd=tmp_path, **env)
    assert initialised.returncode == 0, initialised.stderr
    for key in [key for key in os.environ if key.startswith("PAI_")]:
        monkeypatch.delenv(key)
    port = free_port()
    env |= {"PAI_LISTEN": f"127.0.0.1:{port}", "PAI_PROCESSES": "2"}
    command = [str(installed.entrypoint)]
    with run_server(command, port, env, log_path=str(tmp_path / "server.log"), timeout=60) as server:
        deadline = time.monotonic() + 30
        while not (workers := workers_under(server.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers) == 1, server.log()[-3000:]
        status, body = http("GET", f"{server.url}/.well-known/wlcg-tape-rest-api")
        assert status == 200 and json.loads(body)["endpoints"][0]["version"] == "v1"
