"""Settings precedence (flags > env > file > defaults) and fail-fast validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pacifica_like.core.config import ConfigError, load_settings
from pacifica_like.storage import registry


def write_ini(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_are_the_embedded_configuration(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})
    assert settings.archive.backend == "posix"
    assert settings.archive.prefix == str(tmp_path / "archive-data")
    assert settings.archive.use_id2filename is True
    assert settings.archive.write_once is False
    assert settings.archive.allow_delete is False
    assert settings.archive.patch_roots == ()
    assert (settings.server.address, settings.server.port) == ("127.0.0.1", 8080)


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path):
    ini = write_ini(
        tmp_path / "archive.ini",
        "[archive]\nprefix = /from/file\nwrite_once = true\nallow_delete = true\n[server]\nport = 9001\n",
    )
    env = {"PAI_CONFIG": ini, "PAI_PREFIX": "/from/env", "PAI_WRITE_ONCE": "false"}
    settings = load_settings(flags={"archive": {"prefix": "/from/flag", "backend": None}}, env=env)
    assert settings.archive.prefix == "/from/flag"
    assert settings.archive.write_once is False  # env beats file
    assert settings.archive.allow_delete is True  # file beats default
    assert settings.server.port == 9001
    assert settings.source_of("archive", "prefix") == "command-line flag for [archive] prefix"
    assert settings.source_of("archive", "write_once") == "environment variable PAI_WRITE_ONCE"
    assert settings.source_of("archive", "allow_delete") == f"{ini} [archive] allow_delete"


def test_explicit_config_file_beats_pai_config(tmp_path: Path):
    a = write_ini(tmp_path / "a.ini", "[archive]\nprefix = /a\n")
    b = write_ini(tmp_path / "b.ini", "[archive]\nprefix = /b\n")
    assert load_settings(env={"PAI_CONFIG": a}, config_file=b).archive.prefix == "/b"


def test_patch_roots_are_resolved_real_directories(tmp_path: Path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    settings = load_settings(env={"PAI_PATCH_ROOTS": f"{tmp_path / 'link'}, {real}"})
    assert settings.archive.patch_roots == (str(real), str(real))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[archive]\nwrite_once = maybe\n", "[archive] write_once"),
        ("[archive]\nbogus = 1\n", "[archive] bogus"),
        ("[nonsense]\nkey = 1\n", "[nonsense]"),
        ("[server]\nport = 70000\n", "[server] port"),
        ("[server]\nport = eighty\n", "[server] port"),
        ("[archive]\npatch_roots = /does/not/exist\n", "[archive] patch_roots"),
        ("[archive]\nprefix =\n", "[archive] prefix"),
        ("not an ini file", "archive.ini"),
    ],
)
def test_bad_file_settings_name_the_file_and_key(tmp_path: Path, text, named):
    ini = write_ini(tmp_path / "archive.ini", text)
    with pytest.raises(ConfigError) as raised:
        load_settings(env={}, config_file=ini)
    assert ini in str(raised.value)
    assert named in str(raised.value)


def test_bad_env_setting_names_the_variable():
    with pytest.raises(ConfigError, match="PAI_ALLOW_DELETE"):
        load_settings(env={"PAI_ALLOW_DELETE": "sometimes"})


def test_missing_files_fail_fast(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"no-such\.ini"):
        load_settings(env={}, config_file=str(tmp_path / "no-such.ini"))
    with pytest.raises(ConfigError, match=r"no-such\.conf"):
        load_settings(env={"PAI_CPCONFIG": str(tmp_path / "no-such.conf")})


def test_unknown_backend_names_its_source(tmp_path: Path):
    ini = write_ini(tmp_path / "archive.ini", "[archive]\nbackend = floppy\n")
    with pytest.raises(ConfigError, match=r"archive.ini \[archive\] backend: unknown backend 'floppy'"):
        registry.create(load_settings(env={}, config_file=ini))


def test_the_example_archive_ini_loads(tmp_path: Path):
    repo = Path(__file__).resolve().parent.parent
    settings = load_settings(env={}, config_file=str(repo / "archive.ini"))
    registry.check(settings)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacifica_like", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_cli_check_config_prints_values_with_their_sources(tmp_path: Path):
    ini = write_ini(tmp_path / "archive.ini", "[archive]\nwrite_once = true\n")
    result = run_cli("check-config", "--config", ini, "--prefix", str(tmp_path), "-p", "9090")
    assert result.returncode == 0, result.stderr
    assert f"[archive] prefix = {tmp_path}    (command-line flag" in result.stdout
    assert f"[archive] write_once = True    ({ini} [archive] write_once)" in result.stdout
    assert "[server] port = 9090" in result.stdout


def test_cli_serve_with_a_bad_setting_exits_2_naming_it(tmp_path: Path):
    ini = write_ini(tmp_path / "archive.ini", "[archive]\nallow_delete = perhaps\n")
    result = run_cli("serve", "--config", ini)
    assert result.returncode == 2
    assert f"{ini} [archive] allow_delete" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_rejects_unknown_backend_types():
    result = run_cli("serve", "-t", "floppy")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
