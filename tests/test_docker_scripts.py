"""The Docker image's install and entry steps, exercised without Docker.

The Dockerfile only calls docker/install.sh and the entrypoint it installs, so
running those scripts here (install into a temp venv, serve from it on a
loopback port) tests what the image does. The Dockerfile itself is checked
statically so it cannot drift away from the scripts.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from httpwire import address, exchange

from pacifica_like.core.ids import id2filename
from pacifica_like.web import nginxfront
from pacifica_like.web.devserver import NGINX_SITE, RunningServer, free_port, nginx_binary, run_server

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
        """Run the entrypoint to completion (for commands that exit); its runtime dir goes in ``cwd``."""
        return subprocess.run(
            [str(self.entrypoint), *args],
            cwd=cwd,
            env=clean_env(**{"TMPDIR": str(cwd), **env}),
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
    run_dir: Path


@pytest.fixture(scope="module")
def served(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Run the installed entrypoint (nginx, uWSGI) on a free port over a not-yet-created data dir."""
    root = tmp_path_factory.mktemp("served")
    data = root / "data"
    run_dir = root / "run"
    port = free_port()
    env = {
        "PAI_LISTEN": f"127.0.0.1:{port}",
        "PAI_PREFIX": str(data),
        "PAI_PROCESSES": "2",
        "PAI_RUN_DIR": str(run_dir),
    }
    with pytest.MonkeyPatch.context() as patch:
        # run_server layers env over os.environ; no stray PAI_* may leak in.
        for key in [key for key in os.environ if key.startswith("PAI_")]:
            patch.delenv(key)
        patch.chdir(root)
        command = [str(installed.entrypoint)]
        with run_server(command, port, env, log_path=str(root / "server.log"), timeout=60) as server:
            yield Served(server, data, port, run_dir)


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


def test_runtime_stage_installs_nginx_light_and_cleans_the_apt_lists() -> None:
    """nginx is the image's front; it must be in the stage that runs, from one tidy RUN."""
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    installs = [run for run in arguments_of(stage, "RUN") if "apt-get install" in run]
    assert installs, "the runtime stage installs no packages"
    nginx = [run for run in installs if "nginx-light" in run.split()]
    assert len(nginx) == 1, installs
    words = nginx[0].split()
    assert "--no-install-recommends" in words and "-y" in words
    assert nginx[0].index("apt-get update") < nginx[0].index("apt-get install")
    assert "rm -rf /var/lib/apt/lists/*" in nginx[0]
    # The front runs as the image's user: nothing may switch back to root after USER.
    keywords = [keyword for keyword, _ in stage]
    assert keywords.index("RUN") < keywords.index("USER")
    assert not [run for run in arguments_of(stage[keywords.index("USER") :], "RUN") if "nginx" in run]


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
    for conf in sorted((REPO / "deploy" / "nginx").glob("*.conf")):
        assert (installed.venv / "deploy" / "nginx" / conf.name).read_bytes() == conf.read_bytes()
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
def test_entrypoint_refuses_a_public_listen_without_identity(installed: Installed, tmp_path: Path) -> None:
    """The image listens on every interface by default: without identity it must say who may do what."""
    result = installed.run_entrypoint(
        cwd=tmp_path, PAI_PREFIX=str(tmp_path / "data"), PAI_LISTEN=f":{free_port()}"
    )
    assert result.returncode != 0
    assert "PAI_ANONYMOUS" in result.stderr and "refusing to serve" in result.stderr
    assert "uWSGI on" not in result.stderr


@pytest.mark.live
def test_entrypoint_passes_options_through_to_uwsgi(installed: Installed, tmp_path: Path) -> None:
    result = installed.run_entrypoint(
        "--version", cwd=tmp_path, PAI_PREFIX=str(tmp_path / "data"), PAI_LISTEN=f"127.0.0.1:{free_port()}"
    )
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
    env |= {"PAI_LISTEN": f"127.0.0.1:{port}", "PAI_PROCESSES": "2", "TMPDIR": str(tmp_path)}
    command = [str(installed.entrypoint)]
    with run_server(command, port, env, log_path=str(tmp_path / "server.log"), timeout=60) as server:
        deadline = time.monotonic() + 30
        while not (workers := workers_under(server.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers) == 1, server.log()[-3000:]
        status, body = http("GET", f"{server.url}/.well-known/wlcg-tape-rest-api")
        assert status == 200 and json.loads(body)["endpoints"][0]["version"] == "v1"


# --- the front: nginx in front of uWSGI, as the image runs it -------------------------------


@pytest.mark.parametrize(
    ("given", "listen"),
    [
        (":8080", "8080"),
        ("127.0.0.1:9000", "127.0.0.1:9000"),
        ("[::]:8080", "[::]:8080"),
        ("/s/a.sock", "unix:/s/a.sock"),
    ],
)
def test_front_listens_where_pai_listen_says(given: str, listen: str) -> None:
    assert nginxfront.listen_directive(given) == listen


@pytest.mark.parametrize(
    "given", ["8080", "bogus", ":0", ":65536", ":\uff18\uff10", "host;evil:80", "[::1:80", ""]
)
def test_front_refuses_an_address_it_cannot_listen_on(given: str) -> None:
    with pytest.raises(ValueError):
        nginxfront.listen_directive(given)


def test_front_config_with_odd_paths_passes_nginx_t(tmp_path: Path) -> None:
    """Paths are quoted: a space or a semicolon in a directory name must not end a directive."""
    work = tmp_path / "run dir;x"
    uploads = tmp_path / "up loads"
    work.mkdir()
    uploads.mkdir()
    config = work / "nginx.conf"
    config.write_text(
        nginxfront.render(f":{free_port()}", str(work / "u.sock"), str(work), NGINX_SITE, str(uploads))
    )
    checked = subprocess.run(
        [nginx_binary(), "-t", "-c", str(config), "-p", f"{work}/", "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    assert (uploads / "body").is_dir()  # nginx made its body buffer where it was told
    with pytest.raises(ValueError, match="longer than"):
        nginxfront.render(":8080", "/" + "s" * 120, str(work), NGINX_SITE)


def chunked(payload: bytes, size: int) -> bytes:
    """Return ``payload`` as a chunked body of ``size``-byte chunks (one with an extension)."""
    pieces = [payload[at : at + size] for at in range(0, len(payload), size)]
    framed = [
        f"{len(piece):x}{';ext=1' if n == 1 else ''}\r\n".encode() + piece + b"\r\n"
        for n, piece in enumerate(pieces)
    ]
    return b"".join(framed) + b"0\r\n\r\n"


def put_head(file_id: int, *fields: str) -> bytes:
    lines = [f"PUT /{file_id} HTTP/1.1", "Host: archive", f"Last-Modified: {LAST_MODIFIED}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.live
def test_entrypoint_stores_a_chunked_upload_whole(served: Served) -> None:
    """uWSGI's own HTTP socket answered 411 here; nginx de-chunks and the whole body is stored."""
    payload = bytes(range(256)) * 6000  # 1.5 MB: past client_body_buffer_size, so via the temp file
    answer = exchange(
        served.server.url, put_head(4242, "Transfer-Encoding: chunked") + chunked(payload, 65_536)
    )
    assert answer.status == 201, answer.describe()
    assert json.loads(answer.body)["total_bytes"] == len(payload)
    assert (served.data / id2filename(4242).lstrip("/")).read_bytes() == payload
    assert http("GET", served.server.url + "/4242") == (200, payload)


@pytest.mark.live
@pytest.mark.parametrize(
    ("fields", "body"),
    [
        (["Transfer-Encoding: chunked"], b"zz\r\nabc\r\n0\r\n\r\n"),
        (["Transfer-Encoding: chunked"], b"2\r\nhello\r\n0\r\n\r\n"),
        (["Content-Length: 15", "Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    ],
    ids=["size-not-hex", "chunk-longer-than-its-size", "content-length-beside-chunked"],
)
def test_entrypoint_refuses_malformed_chunked_uploads_and_stores_nothing(
    served: Served, fields: list[str], body: bytes
) -> None:
    old = b"the good old version\n"
    assert http("PUT", served.server.url + "/4243", old, **{"Last-Modified": LAST_MODIFIED})[0] == 201
    answer = exchange(served.server.url, put_head(4243, *fields) + body)
    assert answer.status == 400, answer.describe()
    assert json.loads(answer.body)["status"] == 400
    assert http("GET", served.server.url + "/4243") == (200, old)
    assert not [path for path in served.data.rglob("*") if path.name.endswith(".part")]


def wait_for(predicate, what: str, seconds: float = 15.0) -> None:
    """Poll ``predicate`` until it holds (another process's state has no event to wait on)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"still waiting after {seconds} s for {what}"
        time.sleep(0.05)


def open_files_under(directory: Path) -> list[str]:
    """Return what processes hold open below ``directory`` (nginx unlinks its temp files at once)."""
    held = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{entry}/fd"):
                    with contextlib.suppress(OSError):
                        target = os.readlink(f"/proc/{entry}/fd/{fd}")
                        if target.startswith(f"{directory}/"):
                            held.append(target)
    return held


@pytest.mark.live
def test_front_buffers_upload_bodies_on_the_data_volume(served: Served) -> None:
    """An upload in flight is nginx's temp file beside the archive, not a worker, and goes when abandoned."""
    body_dir = served.data / ".pacifica-like-uploads" / "body"
    assert body_dir.is_dir() and os.stat(body_dir).st_dev == os.stat(served.data).st_dev
    with socket.create_connection(address(served.server.url), timeout=10) as sock:
        # Past client_body_buffer_size (1 MiB), so nginx spills the body to a temp file.
        sock.sendall(put_head(4244, f"Content-Length: {4 << 20}") + b"x" * (3 << 19))
        wait_for(lambda: open_files_under(body_dir), "nginx's temp file of the half-sent upload")
        assert http("GET", served.server.url + "/")[0] == 200  # no worker is held meanwhile
    wait_for(lambda: not open_files_under(body_dir), "nginx to drop the abandoned upload's temp file")
    assert not list(body_dir.iterdir())  # unlinked when created: a killed nginx leaves nothing either
    assert http("GET", served.server.url + "/4244")[0] == 404


@pytest.mark.live
def test_slow_clients_do_not_stop_the_entrypoint(served: Served) -> None:
    """400 connections with half a request (most of them half a head) do not keep GET / waiting."""
    payload = b"small\n"
    assert http("PUT", served.server.url + "/4245", payload, **{"Last-Modified": LAST_MODIFIED})[0] == 201
    held: list[socket.socket] = []
    try:
        for number in range(400):
            sock = socket.create_connection(address(served.server.url), timeout=10)
            held.append(sock)
            if number % 4:
                sock.sendall(b"GET /4245 HTTP/1.1\r\nHost: archive\r\nX-Slow: ")
            else:
                sock.sendall(put_head(5000 + number, "Content-Length: 100000") + b"partial")
        slowest = 0.0
        for _ in range(5):
            began = time.monotonic()
            assert http("GET", served.server.url + "/")[0] == 200
            assert http("GET", served.server.url + "/4245") == (200, payload)
            slowest = max(slowest, time.monotonic() - began)
        # Generous for a loaded machine; uWSGI's own socket with 2 workers does not answer at all.
        assert slowest < 5.0, f"GET / and a small GET took {slowest:.2f} s beside 400 slow clients"
    finally:
        for sock in held:
            sock.close()
    assert http("GET", served.server.url + "/5000")[0] == 404


def front_processes(config: Path) -> dict[int, str]:
    """Return pid -> command line of the nginx master started with ``config`` and its workers.

    Workers name no config on their command line; they share the master's
    session (uWSGI starts each daemon in a session of its own).
    """
    sessions: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                sessions[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[3])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                commands[int(entry)] = handle.read().decode(errors="replace").replace("\0", " ").strip()
        except (OSError, ValueError, IndexError):
            continue
    front_sessions = {
        sessions[pid]
        for pid, command in commands.items()
        if command.startswith("nginx: master") and str(config) in command and pid in sessions
    }
    return {
        pid: commands[pid]
        for pid, session in sessions.items()
        if session in front_sessions and commands.get(pid, "").startswith("nginx")
    }


def alive(pids: Iterable[int]) -> list[int]:
    """Return those of ``pids`` that still run (a zombie counts as gone)."""
    running = []
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] != "Z":
                running.append(pid)
    return running


def answers(url: str) -> bool:
    """Whether ``GET url`` is a 200 now (a refused or reset connection is a no)."""
    try:
        return http("GET", url)[0] == 200
    except OSError:
        return False


@pytest.mark.live
def test_entrypoint_restarts_a_killed_nginx_and_stops_it_with_uwsgi(
    installed: Installed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process tree: a killed nginx master takes its workers along and comes back; `docker stop`
    (SIGTERM to PID 1, uWSGI's master) takes nginx down, workers and all."""
    for key in [key for key in os.environ if key.startswith("PAI_")]:
        monkeypatch.delenv(key)
    run_dir = tmp_path / "run"
    config = run_dir / "nginx.conf"
    port = free_port()
    env = {
        "PAI_LISTEN": f"127.0.0.1:{port}",
        "PAI_PREFIX": str(tmp_path / "data"),
        "PAI_PROCESSES": "1",
        "PAI_RUN_DIR": str(run_dir),
        "PAI_NGINX_WORKERS": "1",
    }
    command = [str(installed.entrypoint)]
    with run_server(command, port, env, log_path=str(tmp_path / "server.log"), timeout=60) as server:
        first = front_processes(config)
        assert len(first) == 2, first  # master and PAI_NGINX_WORKERS=1 worker
        assert (run_dir / "uwsgi.sock").is_socket()
        master = int((run_dir / "nginx.pid").read_text())
        os.kill(master, signal.SIGKILL)
        # Its orphaned worker would keep the port, and the next master could never bind it.
        wait_for(lambda: not alive(first), "the killed master's worker to go")
        wait_for(lambda: len(front_processes(config)) == 2, "uWSGI to start nginx again")
        second = front_processes(config)
        assert not set(second) & set(first)
        wait_for(lambda: answers(server.url + "/"), "the new nginx to answer")
        os.kill(server.process.pid, signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.log()[-3000:]
    assert front_processes(config) == {}
    assert not alive(second), second
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "bind()" not in server.log(), server.log()[-3000:]


@pytest.mark.live
def test_entrypoint_refuses_to_start_without_nginx(installed: Installed, tmp_path: Path) -> None:
    missing = tmp_path / "no-nginx-here"
    result = installed.run_entrypoint(cwd=tmp_path, PAI_PREFIX=str(tmp_path / "data"), PAI_NGINX=str(missing))
    assert result.returncode != 0
    assert f"nginx not found at {missing}" in result.stderr and "nginx-light" in result.stderr
    assert "uWSGI on" not in result.stderr


@pytest.mark.live
def test_entrypoint_refuses_a_runtime_dir_others_can_write(installed: Installed, tmp_path: Path) -> None:
    """The socket and nginx.conf live there; a directory others can write would let them swap both."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    result = installed.run_entrypoint(
        cwd=tmp_path, PAI_PREFIX=str(tmp_path / "data"), PAI_RUN_DIR=str(shared)
    )
    assert result.returncode != 0
    assert f"runtime directory {shared} is writable by others" in result.stderr
    assert not (shared / "nginx.conf").exists()
