"""Settings precedence (flags > env > file > defaults) and fail-fast validation."""

from __future__ import annotations

import os
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


# -- every key declared once (pacifica_like.core.settings_schema); the rest derived ---------------

REPO = Path(__file__).resolve().parent.parent

#: The variables deployments set today; each must keep naming its key.
ENV_IN_USE = {
    "PAI_BACKEND_TYPE": ("archive", "backend"),
    "PAI_PREFIX": ("archive", "prefix"),
    "PAI_USE_ID2FILENAME": ("archive", "use_id2filename"),
    "PAI_WRITE_ONCE": ("archive", "write_once"),
    "PAI_ALLOW_DELETE": ("archive", "allow_delete"),
    "PAI_PATCH_ROOTS": ("archive", "patch_roots"),
    "PAI_CATALOG": ("archive", "catalog"),
    "PAI_TAPE_LIBRARY": ("tape", "library"),
    "PAI_TAPE_TIME_SCALE": ("tape", "time_scale"),
    "PAI_TAPE_AUTO_STAGE": ("tape", "auto_stage"),
    "PAI_TAPE_STAGER": ("tape", "stager"),
    "PAI_SIDEBAND_DATABASE": ("sideband", "database"),
    "PAI_SAM_QFS_PREFIX": ("sideband", "sam_qfs_prefix"),
    "PAI_SIDEBAND_HSM": ("sideband", "hsm"),
    "PAI_BULK_SCHEDULER": ("bulk", "scheduler"),
    "PAI_ADDRESS": ("server", "address"),
    "PAI_PORT": ("server", "port"),
    "PAI_THREADS": ("server", "threads"),
    "PAI_CONNECTION_LIMIT": ("server", "connection_limit"),
    "PAI_IDLE_TIMEOUT": ("server", "idle_timeout"),
    "PROMETHEUS_MULTIPROC_DIR": ("server", "metrics_dir"),
    "PAI_ACCESS_LOG": ("server", "access_log"),
}


def declared_keys() -> list[tuple[str, str]]:
    from pacifica_like.core.config import SCHEMA

    return [(section, key) for section, keys in SCHEMA.items() for key in keys]


def test_every_variable_in_use_still_names_its_key():
    from pacifica_like.core.config import SCHEMA

    declared = {
        option.env: (section, key) for section, keys in SCHEMA.items() for key, option in keys.items()
    }
    assert {env: declared.get(env) for env in ENV_IN_USE} == ENV_IN_USE


def test_every_declared_variable_is_honoured(tmp_path: Path, monkeypatch):
    from pacifica_like.core.config import SCHEMA

    monkeypatch.chdir(tmp_path)
    samples = {"PAI_CATALOG": "off", "PAI_SIDEBAND_DATABASE": f"sqlite:///{tmp_path}/sb.sqlite"}
    env = {
        option.env: samples.get(option.env, option.default or "")
        for keys in SCHEMA.values()
        for option in keys.values()
        if option.env
    }
    settings = load_settings(env=env)
    for section, keys in SCHEMA.items():
        for key, option in keys.items():
            if option.env:
                assert settings.source_of(section, key) == f"environment variable {option.env}"
    assert settings.archive.catalog is None
    assert settings.sideband.database == f"sqlite:///{tmp_path}/sb.sqlite"


def test_every_declared_default_is_what_a_key_left_unset_gets(tmp_path: Path, monkeypatch):
    from pacifica_like.core.config import SCHEMA

    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})
    derived = {("archive", "catalog")}  # unset: SQLite under the prefix
    for section, keys in SCHEMA.items():
        for key, option in keys.items():
            if (section, key) not in derived:
                assert getattr(getattr(settings, section), key) == option.default_value(), (section, key)
    assert settings.tape.volume_capacity == 18 * 10**12
    assert settings.bulk.mount_min_bytes == 50 * 10**9
    assert settings.archive.catalog == f"sqlite:///{tmp_path / 'archive-data' / '.catalog.sqlite'}"


def test_relative_default_paths_resolve_where_the_settings_are_built(tmp_path: Path, monkeypatch):
    from pacifica_like.core.config import TapeSettings

    monkeypatch.chdir(tmp_path)
    assert TapeSettings().library == str(tmp_path / "tape-library")
    assert TapeSettings().volume_capacity == 18 * 10**12


def test_a_flag_for_an_undeclared_key_fails_naming_it():
    with pytest.raises(ConfigError, match=r"\[tape\] no_such_key"):
        load_settings(flags={"tape": {"no_such_key": 1}}, env={})


def test_text_flags_go_through_the_declared_parser(tmp_path: Path):
    settings = load_settings(flags={"tape": {"volume_capacity": "2 MiB"}, "server": {"port": "9091"}}, env={})
    assert (settings.tape.volume_capacity, settings.server.port) == (2 << 20, 9091)
    with pytest.raises(ConfigError, match=r"command-line flag for \[server\] threads: expected a positive"):
        load_settings(flags={"server": {"threads": "0"}}, env={})


def test_file_sections_other_than_archive_follow_the_same_precedence(tmp_path: Path):
    ini = write_ini(tmp_path / "a.ini", "[tape]\ntime_scale = 0.5\nvolumes = 3\n[bulk]\nscheduler = off\n")
    settings = load_settings(env={"PAI_TAPE_TIME_SCALE": "0.25"}, config_file=ini)
    assert (settings.tape.time_scale, settings.tape.volumes, settings.bulk.scheduler) == (0.25, 3, "off")
    assert settings.source_of("tape", "volumes") == f"{ini} [tape] volumes"
    with pytest.raises(ConfigError, match=r"a.ini \[bulk\] scheduler: expected one of in-process, off"):
        load_settings(env={}, config_file=write_ini(tmp_path / "a.ini", "[bulk]\nscheduler = sometimes\n"))


def test_check_config_lists_every_declared_key_once(tmp_path: Path):
    result = run_cli("check-config", "--prefix", str(tmp_path), "--config", write_ini(tmp_path / "a.ini", ""))
    assert result.returncode == 0, result.stderr
    listed = [line.split(" = ", 1)[0] for line in result.stdout.splitlines() if line.startswith("[")]
    assert listed == [f"[{section}] {key}" for section, key in declared_keys()]


def test_check_config_hides_database_passwords(tmp_path: Path):
    env = {**os.environ, "PAI_CATALOG": "postgresql://gw:s3cret@db.invalid/archive"}
    result = run_cli("check-config", "--prefix", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert (
        "[archive] catalog = postgresql://gw:***@db.invalid/archive    (environment variable PAI_CATALOG)"
        in (result.stdout)
    )
    assert "s3cret" not in result.stdout


def test_every_declared_flag_reaches_its_key(tmp_path: Path):
    result = run_cli(
        "check-config",
        *("-t", "memory", "--prefix", str(tmp_path), "-a", "0.0.0.0", "--port", "9092", "--threads", "3"),
        "--config",
        write_ini(tmp_path / "a.ini", "[archive]\ncatalog = off\n"),
    )
    assert result.returncode == 0, result.stderr
    for line in (
        "[archive] backend = memory    (command-line flag for [archive] backend)",
        f"[archive] prefix = {tmp_path}    (command-line flag for [archive] prefix)",
        "[server] address = 0.0.0.0    (command-line flag for [server] address)",
        "[server] port = 9092    (command-line flag for [server] port)",
        "[server] threads = 3    (command-line flag for [server] threads)",
    ):
        assert line in result.stdout.splitlines()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("-p", "70000"), "command-line flag for [server] port: port 70000 is outside 0-65535"),
        (("--threads", "0"), "command-line flag for [server] threads"),
        (("--prefix", ""), "command-line flag for [archive] prefix: must not be empty"),
    ],
)
def test_bad_flag_values_exit_2_naming_the_flag(args, named):
    result = run_cli("check-config", *args)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_settings_table_is_the_generated_one():
    from pacifica_like.core.config import settings_table, table_in

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert table_in(readme) == settings_table(), (
        "README.md's settings table drifted from pacifica_like/core/settings_schema.py; "
        "run: python -m pacifica_like.core.config --update README.md"
    )
    for section, key in declared_keys():
        assert f"| `[{section}] {key}` |" in settings_table()


def test_the_generator_rewrites_a_stale_table_in_place(tmp_path: Path):
    from pacifica_like.core.config import TABLE_BEGIN, TABLE_END, settings_table

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{TABLE_BEGIN}\n| stale |\n{TABLE_END}\n\nafter\n")
    done = subprocess.run(
        [sys.executable, "-m", "pacifica_like.core.config", "--update", str(readme)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert readme.read_text() == f"# title\n\n{TABLE_BEGIN}\n{settings_table()}{TABLE_END}\n\nafter\n"
    printed = subprocess.run(
        [sys.executable, "-m", "pacifica_like.core.config", "--markdown"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.stdout == settings_table()


def test_flagged_keys_have_distinct_names_and_flags():
    """A flag's value lands on ``args.<key>``, so two flagged keys may not share a name or a flag."""
    from pacifica_like.core.config import SCHEMA, flag_options

    flagged = flag_options(*SCHEMA)
    assert len({key for _, key, _ in flagged}) == len(flagged)
    every_flag = [flag for _, _, option in flagged for flag in option.flags]
    assert len(set(every_flag)) == len(every_flag)
    assert {key for _, key, _ in flagged} == {"backend", "prefix", "address", "port", "threads"}
