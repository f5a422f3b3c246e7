"""Settings from archive.ini, PAI_* environment variables and command-line flags.

The only module that reads the environment. Precedence is flags > env > file >
defaults, every source is honoured, and each value remembers where it came
from so a bad one fails at start naming the file and key (or the variable or
flag). Nothing is read at import: callers ask for :func:`load_settings` when
they start, which keeps uWSGI's pre-fork import free of I/O and lets tests
build as many differently-configured apps as they like.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message names its source."""


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _parse_port(raw: str) -> int:
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0-65535")
    return port


def _parse_positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {raw!r}")
    return value


def _parse_nonempty(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _parse_seconds(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"expected a number of seconds >= 0, got {raw!r}")
    return value


def _parse_rate(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"expected a positive rate, got {raw!r}")
    return value


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_size(raw: str) -> int:
    """Parse a byte count such as ``18TB``, ``1.5 GiB`` or ``4096`` (decimal and binary units).

    >>> parse_size("18TB"), parse_size("2 MiB"), parse_size("512")
    (18000000000000, 2097152, 512)
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", raw)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"expected a size like 18TB, 512MiB or 4096, got {raw!r}")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value < 1:
        raise ValueError(f"size must be at least one byte, got {raw!r}")
    return value


def _parse_path(raw: str) -> str:
    return os.path.abspath(_parse_nonempty(raw))


def _parse_optional_path(raw: str) -> str | None:
    return os.path.abspath(raw.strip()) if raw.strip() else None


#: Database URL schemes the gateway catalog accepts (peewee's playhouse.db_url names).
CATALOG_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")
#: The value of ``[archive] catalog`` that turns the catalog (and the inventory) off.
CATALOG_OFF = "off"
#: The catalog's default place, under the prefix: a hidden name, so listings and audits skip it.
DEFAULT_CATALOG_NAME = ".catalog.sqlite"


def _parse_catalog(raw: str) -> str:
    """Check a catalog database URL; make a SQLite path absolute; ``off`` disables the catalog.

    >>> _parse_catalog("postgresql://gw@db.example:5432/archive")
    'postgresql://gw@db.example:5432/archive'
    >>> _parse_catalog("sqlite:////srv/state/catalog.sqlite")
    'sqlite:////srv/state/catalog.sqlite'
    >>> _parse_catalog(" Off ")
    'off'
    """
    value = _parse_nonempty(raw)
    if value.lower() in (CATALOG_OFF, "none", "false", "no"):
        return CATALOG_OFF
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in CATALOG_SCHEMES:
        raise ValueError(
            f"expected a database URL ({', '.join(s + '://...' for s in CATALOG_SCHEMES)}) or off, "
            f"got {redact_url(value)!r}"
        )
    if scheme.lower() == "sqlite":
        path = rest[1:] if rest.startswith("/") else ""
        if not path or "?" in path:
            raise ValueError(f"a SQLite catalog is sqlite:///PATH (a file), got {value!r}")
        # Relative to the directory the settings were loaded in, like every other path.
        return "sqlite:///" + os.path.abspath(path)
    return value


def redact_url(url: str) -> str:
    """Hide the password in a database URL, for printing and logs.

    >>> redact_url("mysql://gw:s3cret@db:3306/archive")
    'mysql://gw:***@db:3306/archive'
    >>> redact_url("sqlite:////srv/catalog.sqlite")
    'sqlite:////srv/catalog.sqlite'
    """
    return re.sub(r"^([a-zA-Z0-9+]+://[^:/@]*):[^@/]*@", r"\1:***@", url)


#: URL schemes a sideband database may have (Oracle HSM's is MySQL; SQLite is the embedded default).
SIDEBAND_SCHEMES = ("sqlite", "mysql")
#: The sideband database's default file, under ``sam_qfs_prefix``: hidden, so listings skip it.
DEFAULT_SIDEBAND_NAME = ".sideband.sqlite"
#: Who keeps the sideband database true: our tape library emulator, or a real HSM outside the gateway.
SIDEBAND_HSM_MODES = ("emulator", "external")
#: Where the bulk-staging scheduler runs: inside ``pacifica-like serve``, or only in ``pacifica-like worker``.
BULK_SCHEDULER_MODES = ("in-process", "off")


def _parse_sideband_url(raw: str) -> str:
    """Check a sideband database URL; make a SQLite path absolute.

    >>> _parse_sideband_url("mysql://samdb:pw@db.example:3306/samqfs")
    'mysql://samdb:pw@db.example:3306/samqfs'
    """
    value = _parse_catalog(raw)
    scheme = value.partition("://")[0].lower()
    if value == CATALOG_OFF or scheme not in SIDEBAND_SCHEMES:
        raise ValueError(
            f"expected sqlite:///PATH or mysql://user:password@host:port/schema, got {redact_url(value)!r}"
        )
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _parse_count(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {raw!r}")
    return value


ACCESS_LOG_FORMATS = ("json", "text", "off")


def _parse_access_log(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ACCESS_LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(ACCESS_LOG_FORMATS)}, got {raw!r}")
    return value


def _parse_dirs(raw: str) -> tuple[str, ...]:
    """Split a comma/newline separated list of directories, resolving links."""
    roots = []
    for item in raw.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        real = os.path.realpath(item)
        if not os.path.isdir(real):
            raise ValueError(f"{item!r} is not an existing directory")
        roots.append(real)
    return tuple(roots)


@dataclass(frozen=True)
class Option:
    """One setting: its parser, default and the env variable that overrides it."""

    parse: Callable[[str], Any]
    default: Any
    env: str | None = None


# The whole schema: section -> key -> Option. A key not listed here is an error.
SCHEMA: dict[str, dict[str, Option]] = {
    "archive": {
        "backend": Option(_parse_nonempty, "posix", "PAI_BACKEND_TYPE"),
        "prefix": Option(_parse_nonempty, "./archive-data", "PAI_PREFIX"),
        "use_id2filename": Option(_parse_bool, True, "PAI_USE_ID2FILENAME"),
        "write_once": Option(_parse_bool, False, "PAI_WRITE_ONCE"),
        "allow_delete": Option(_parse_bool, False, "PAI_ALLOW_DELETE"),
        "patch_roots": Option(_parse_dirs, (), "PAI_PATCH_ROOTS"),
        # The gateway's state database (inventory); None: SQLite under the prefix, "off": none.
        "catalog": Option(_parse_catalog, None, "PAI_CATALOG"),
    },
    "tape": {
        # The emulated library: its directory (volumes + catalog) and its size.
        "library": Option(_parse_path, "./tape-library", "PAI_TAPE_LIBRARY"),
        "drives": Option(_parse_positive, 2),
        "volumes": Option(_parse_positive, 8),
        "volume_capacity": Option(parse_size, 18 * 10**12),
        # The cost model (an LTO-9 class drive); time_scale multiplies every delay, 0 = none.
        "mount_seconds": Option(_parse_seconds, 30.0),
        "unmount_seconds": Option(_parse_seconds, 20.0),
        "locate_seconds": Option(_parse_seconds, 60.0),
        "read_mib_s": Option(_parse_rate, 381.0),
        "write_mib_s": Option(_parse_rate, 381.0),
        "time_scale": Option(_parse_seconds, 1.0, "PAI_TAPE_TIME_SCALE"),
        # Policy: read every new tape copy back before it counts as safe to release.
        "verify_after_write": Option(_parse_bool, True),
        "auto_stage": Option(_parse_bool, False, "PAI_TAPE_AUTO_STAGE"),
        "stage_timeout": Option(_parse_seconds, 60.0),
        # POST /<id> requests (all processes of this host) that may wait for a recall at once;
        # beyond, POST answers 202 at once, so waiting clients cannot hold every worker.
        "stage_waiters": Option(_parse_count, 2),
        # The compiled C stager; empty means the one built with the package.
        "stager": Option(_parse_optional_path, None, "PAI_TAPE_STAGER"),
    },
    "sideband": {
        # Database URL; empty: sqlite:///<sam_qfs_prefix>/.sideband.sqlite when backend = sideband,
        # and no sideband upkeep by the tape backend.
        "database": Option(_parse_sideband_url, None, "PAI_SIDEBAND_DATABASE"),
        # The mounted SAM-QFS filesystem holding the files; empty: [archive] prefix.
        "sam_qfs_prefix": Option(_parse_optional_path, None, "PAI_SAM_QFS_PREFIX"),
        # emulator: our tape library is the HSM and keeps the tables true; external: a real HSM does.
        "hsm": Option(_one_of(SIDEBAND_HSM_MODES), "emulator", "PAI_SIDEBAND_HSM"),
        # Seconds to wait for the database to connect or answer before a request gets a 503.
        "connect_timeout": Option(_parse_rate, 5.0),
        # Pooled connections per process (one per request thread at most).
        "max_connections": Option(_parse_positive, 32),
    },
    "bulk": {
        # What /.well-known/wlcg-tape-rest-api calls this endpoint.
        "site_name": Option(_parse_nonempty, "pacifica_like"),
        "max_files_per_request": Option(_parse_positive, 100_000),
        # Files a client may have waiting (not terminal) across its requests.
        "max_in_flight_per_client": Option(_parse_positive, 1_000_000),
        # Advertised: clients should not poll a request more often than this.
        "min_poll_seconds": Option(_parse_seconds, 1.0),
        "scheduler": Option(_one_of(BULK_SCHEDULER_MODES), "in-process", "PAI_BULK_SCHEDULER"),
        # Drives the scheduler may hold at once (0: every drive of the library).
        "drives": Option(_parse_count, 0),
        # Files being recalled at once, over every volume.
        "max_recalls_in_flight": Option(_parse_positive, 64),
        # A volume is mounted once its queue holds this many files or bytes, or its oldest
        # file has waited max_wait_seconds (so small queues never starve).
        "mount_min_files": Option(_parse_positive, 32),
        "mount_min_bytes": Option(parse_size, 50 * 10**9),
        "max_wait_seconds": Option(_parse_seconds, 300.0),
        # A recall running longer than this is failed by the watchdog, with that reason.
        "recall_timeout": Option(_parse_seconds, 3600.0),
        "max_attempts": Option(_parse_positive, 3),
        # Pin lifetime when a request gives no diskLifetime, and the longest one granted.
        "default_pin_seconds": Option(_parse_seconds, 3600.0),
        "max_pin_seconds": Option(_parse_seconds, 7 * 86400.0),
        # Seconds between scheduler passes when there is nothing to do.
        "poll_seconds": Option(_parse_rate, 1.0),
        # Heavy requests (naming heavy_request_files files or more: archiveinfo, stage, cancel,
        # release, a poll's page) served at once by all processes of this host; beyond, 429.
        "max_heavy_requests": Option(_parse_positive, 2),
        "heavy_request_files": Option(_parse_positive, 1000),
        # A finished request (and its file rows and pins) is forgotten this long after it finished,
        # once none of its pins holds any more.
        "retention_seconds": Option(_parse_seconds, 7 * 86400.0),
        # Requests a client may have stored (open, or finished and retained); beyond, 429.
        "max_requests_per_client": Option(_parse_positive, 1000),
    },
    "server": {
        "address": Option(_parse_nonempty, "127.0.0.1", "PAI_ADDRESS"),
        "port": Option(_parse_port, 8080, "PAI_PORT"),
        "threads": Option(_parse_positive, 16, "PAI_THREADS"),
        # serve only (uWSGI's front is nginx, see README): connections held at once, and
        # seconds a connection may stay silent (between bytes of headers or body) before it is closed.
        "connection_limit": Option(_parse_positive, 4096, "PAI_CONNECTION_LIMIT"),
        "idle_timeout": Option(_parse_positive, 60, "PAI_IDLE_TIMEOUT"),
        # uWSGI only: where worker processes keep their Prometheus counters (none: a fresh temp dir).
        "metrics_dir": Option(_parse_optional_path, None, "PROMETHEUS_MULTIPROC_DIR"),
        "access_log": Option(_parse_access_log, "json", "PAI_ACCESS_LOG"),
    },
}

CONFIG_ENV = "PAI_CONFIG"
CPCONFIG_ENV = "PAI_CPCONFIG"


@dataclass(frozen=True)
class ArchiveSettings:
    """The ``[archive]`` section: which backend, where, and its policies."""

    backend: str
    prefix: str
    use_id2filename: bool
    write_once: bool
    allow_delete: bool
    patch_roots: tuple[str, ...]
    #: Database URL of the gateway catalog (the inventory), None when it is off.
    catalog: str | None = None


@dataclass(frozen=True)
class TapeSettings:
    """The ``[tape]`` section: the emulated library, its cost model and recall policy.

    Sizes are bytes, rates MiB/s, times seconds before ``time_scale`` applies.
    """

    library: str = os.path.abspath("./tape-library")
    drives: int = 2
    volumes: int = 8
    volume_capacity: int = 18 * 10**12
    mount_seconds: float = 30.0
    unmount_seconds: float = 20.0
    locate_seconds: float = 60.0
    read_mib_s: float = 381.0
    write_mib_s: float = 381.0
    time_scale: float = 1.0
    verify_after_write: bool = True
    auto_stage: bool = False
    stage_timeout: float = 60.0
    stage_waiters: int = 2
    stager: str | None = None


@dataclass(frozen=True)
class SidebandSettings:
    """The ``[sideband]`` section: an Oracle-HSM-style sideband database beside a SAM-QFS mount.

    ``database`` None: not configured (the sideband backend then uses
    ``DEFAULT_SIDEBAND_NAME`` under ``sam_qfs_prefix``; see :meth:`database_url`);
    ``sam_qfs_prefix`` None: the archive prefix.
    """

    database: str | None = None
    sam_qfs_prefix: str | None = None
    hsm: str = "emulator"
    connect_timeout: float = 5.0
    max_connections: int = 32


@dataclass(frozen=True)
class BulkSettings:
    """The ``[bulk]`` section: the bulk-staging API's limits and its recall scheduler's policy.

    Times are seconds, sizes bytes; ``drives`` 0 means every drive of the library.
    """

    site_name: str = "pacifica_like"
    max_files_per_request: int = 100_000
    max_in_flight_per_client: int = 1_000_000
    min_poll_seconds: float = 1.0
    scheduler: str = "in-process"
    drives: int = 0
    max_recalls_in_flight: int = 64
    mount_min_files: int = 32
    mount_min_bytes: int = 50 * 10**9
    max_wait_seconds: float = 300.0
    recall_timeout: float = 3600.0
    max_attempts: int = 3
    default_pin_seconds: float = 3600.0
    max_pin_seconds: float = 7 * 86400.0
    poll_seconds: float = 1.0
    max_heavy_requests: int = 2
    heavy_request_files: int = 1000
    retention_seconds: float = 7 * 86400.0
    max_requests_per_client: int = 1000


@dataclass(frozen=True)
class ServerSettings:
    """The ``[server]`` section: where ``pacifica-like serve`` listens, how it reports."""

    address: str
    port: int
    threads: int
    #: Directory shared by uWSGI workers for Prometheus counters (prometheus_client multiprocess mode).
    metrics_dir: str | None = None
    #: Access log format: ``json`` (one object per line), ``text`` or ``off``.
    access_log: str = "json"
    #: serve: connections held at once (each one descriptor; the open-file limit is raised to fit).
    connection_limit: int = 4096
    #: serve: seconds a connection may send nothing before it is closed.
    idle_timeout: int = 60


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to build the app; immutable once loaded."""

    archive: ArchiveSettings
    server: ServerSettings
    tape: TapeSettings = field(default_factory=TapeSettings)
    sideband: SidebandSettings = field(default_factory=SidebandSettings)
    bulk: BulkSettings = field(default_factory=BulkSettings)
    config_file: str | None = None
    cpconfig_file: str | None = None
    sources: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def source_of(self, section: str, key: str) -> str:
        """Name where a value came from, for error messages."""
        return self.sources.get((section, key), f"default [{section}] {key}")

    @property
    def sam_qfs_prefix(self) -> str:
        """The directory holding the sideband backend's files (``[archive] prefix`` unless set)."""
        return self.sideband.sam_qfs_prefix or self.archive.prefix

    def sideband_url(self) -> str:
        """The sideband database URL, with the embedded SQLite default under ``sam_qfs_prefix``."""
        return self.sideband.database or "sqlite:///" + os.path.join(
            self.sam_qfs_prefix, DEFAULT_SIDEBAND_NAME
        )


def load_settings(
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
    cpconfig_file: str | None = None,
) -> Settings:
    """Merge defaults, the ini file, the environment and flags into Settings.

    ``flags`` maps section -> key -> already-typed value (None means unset),
    ``config_file`` beats ``PAI_CONFIG``. Raises ConfigError naming the source
    of the first bad value.
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get(CONFIG_ENV) or None
    cpconfig_file = cpconfig_file or env.get(CPCONFIG_ENV) or None
    if cpconfig_file is not None and not os.path.isfile(cpconfig_file):
        raise ConfigError(f"CherryPy config {cpconfig_file}: no such file")

    values: dict[tuple[str, str], Any] = {}
    sources: dict[tuple[str, str], str] = {}
    for section, options in SCHEMA.items():
        for key, option in options.items():
            values[section, key] = option.default

    if config_file is not None:
        for (section, key), raw in _read_ini(config_file).items():
            where = f"{config_file} [{section}] {key}"
            values[section, key] = _convert(SCHEMA[section][key], raw, where)
            sources[section, key] = where

    for section, options in SCHEMA.items():
        for key, option in options.items():
            if option.env and env.get(option.env) is not None:
                where = f"environment variable {option.env}"
                values[section, key] = _convert(option, env[option.env], where)
                sources[section, key] = where

    for section, given in (flags or {}).items():
        for key, value in given.items():
            if value is not None:
                values[section, key] = value
                sources[section, key] = f"command-line flag for [{section}] {key}"

    archive = {key: values["archive", key] for key in SCHEMA["archive"]}
    archive["prefix"] = os.path.abspath(archive["prefix"])
    if archive["catalog"] is None:
        # Beside the data it describes, whatever directory a command runs in (audits run anywhere).
        archive["catalog"] = "sqlite:///" + os.path.join(archive["prefix"], DEFAULT_CATALOG_NAME)
    elif archive["catalog"] == CATALOG_OFF:
        archive["catalog"] = None
    server = {key: values["server", key] for key in SCHEMA["server"]}
    tape = {key: values["tape", key] for key in SCHEMA["tape"]}
    tape["library"] = os.path.abspath(tape["library"])
    sideband = {key: values["sideband", key] for key in SCHEMA["sideband"]}
    bulk = {key: values["bulk", key] for key in SCHEMA["bulk"]}
    archive["patch_roots"] = _check_patch_roots(archive, tape, sideband, sources)
    return Settings(
        archive=ArchiveSettings(**archive),
        server=ServerSettings(**server),
        tape=TapeSettings(**tape),
        sideband=SidebandSettings(**sideband),
        bulk=BulkSettings(**bulk),
        config_file=config_file,
        cpconfig_file=cpconfig_file,
        sources=sources,
    )


def _check_patch_roots(
    archive: Mapping[str, Any],
    tape: Mapping[str, Any],
    sideband: Mapping[str, Any],
    sources: Mapping[tuple[str, str], str],
) -> tuple[str, ...]:
    """Return the patch roots as real directories; ConfigError if one overlaps what the gateway keeps.

    PATCH moves files *out* of these roots. A root that contains the archive
    prefix (or lies inside it) would let a client move archived files and the
    catalog around; so would one holding the tape library or a SQLite database.
    Flags arrive unparsed, so every root is resolved here, whatever its source.
    """
    where = sources.get(("archive", "patch_roots"), "default [archive] patch_roots")
    roots = []
    for root in archive["patch_roots"]:
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise ConfigError(f"{where}: {root!r} is not an existing directory")
        roots.append(real)
    if not roots:
        return ()

    def source(section: str, key: str) -> str:
        return sources.get((section, key), f"default [{section}] {key}")

    # (path, what it is, is a directory): directories overlap either way, files only by lying inside a root.
    kept: list[tuple[str, str, bool]] = [
        (archive["prefix"], f"the archive prefix ({source('archive', 'prefix')})", True)
    ]
    if sideband["sam_qfs_prefix"]:
        kept.append(
            (sideband["sam_qfs_prefix"], f"sam_qfs_prefix ({source('sideband', 'sam_qfs_prefix')})", True)
        )
    if ("tape", "library") in sources or os.path.isdir(tape["library"]):
        kept.append((tape["library"], f"the tape library ({source('tape', 'library')})", True))
    for section, key, url in (
        ("archive", "catalog", archive["catalog"]),
        ("sideband", "database", sideband["database"]),
    ):
        if url and url.startswith("sqlite:///"):
            kept.append((url[len("sqlite://") :], f"the {section} {key} ({source(section, key)})", False))
    for root in roots:
        for path, what, is_dir in kept:
            real = os.path.realpath(path)
            if _within(real, root) or (is_dir and _within(root, real)):
                raise ConfigError(
                    f"{where}: patch root {root} overlaps {what} at {real}; "
                    "PATCH would move files the gateway keeps"
                )
    return tuple(roots)


def _within(path: str, directory: str) -> bool:
    """Say whether ``path`` is ``directory`` or below it (both absolute and normalised)."""
    return os.path.commonpath([path, directory]) == directory


def _read_ini(path: str) -> dict[tuple[str, str], str]:
    """Read an ini file, rejecting sections and keys the schema does not know."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00unused")
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"archive config {path}: {exc.strerror}") from exc
    except configparser.Error as exc:
        raise ConfigError(f"archive config {path}: {exc}") from exc
    found = {}
    for section in parser.sections():
        if section not in SCHEMA:
            known = ", ".join(sorted(SCHEMA))
            raise ConfigError(f"{path}: unknown section [{section}] (known: {known})")
        for key, raw in parser.items(section):
            if key not in SCHEMA[section]:
                known = ", ".join(sorted(SCHEMA[section]))
                raise ConfigError(f"{path} [{section}] {key}: unknown key (known: {known})")
            found[section, key] = raw
    return found


def _convert(option: Option, raw: str, where: str) -> Any:
    try:
        return option.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
