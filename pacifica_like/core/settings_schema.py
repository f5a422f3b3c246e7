"""Every setting, declared once: a typed field of its section's dataclass.

Each field names its parser, its default (written as it would be in
archive.ini, and parsed like any other value when a section is built, so a
relative path resolves against the directory the settings are loaded in, never
the one the module was imported in), its environment variable, its
command-line flags and a one-line help. :mod:`pacifica_like.core.config`
derives the rest from these fields: the schema it validates files against, the
environment and flag sources, ``check-config``'s listing and the README's
configuration table. Adding a key means adding one field here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

#: The field metadata key holding a setting's :class:`Option`.
OPTION_KEY = "pacifica_like.setting"


@dataclass(frozen=True)
class Option:
    """How one key is read, documented and overridden (the metadata of its dataclass field)."""

    #: Turns the text of the file, a variable or a flag into the typed value; ValueError if bad.
    parse: Callable[[str], Any]
    #: The default as archive.ini would spell it; None: unset, ``unset`` says what that means.
    default: str | None
    #: One line for the README table and the flag's ``--help``.
    help: str
    env: str | None = None
    flags: tuple[str, ...] = ()
    #: What an unset (None or empty) default means, for the table.
    unset: str = ""
    #: A database URL that may carry a password: printed redacted.
    secret: bool = False

    def default_value(self) -> Any:
        """Return the typed default (None when unset)."""
        return None if self.default is None else self.parse(self.default)


def setting(
    parse: Callable[[str], Any],
    default: str | None,
    help: str,
    *,
    env: str | None = None,
    flags: tuple[str, ...] = (),
    unset: str = "",
    secret: bool = False,
) -> Any:
    """Declare one key: a dataclass field whose default is ``parse(default)``, built per instance."""
    option = Option(parse, default, help, env, flags, unset, secret)
    metadata = {OPTION_KEY: option}
    if default is None:
        return dataclasses.field(default=None, metadata=metadata)
    return dataclasses.field(default_factory=partial(parse, default), metadata=metadata)


# -- parsers: text -> typed value, ValueError naming what was expected ---------------------------


def parse_bool(raw: str) -> bool:
    """Parse true/false, yes/no, on/off or 1/0 (any case)."""
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def parse_port(raw: str) -> int:
    """Parse a TCP port number, 0-65535."""
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0-65535")
    return port


def parse_positive(raw: str) -> int:
    """Parse an integer of at least 1."""
    value = int(raw)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {raw!r}")
    return value


def parse_count(raw: str) -> int:
    """Parse an integer of at least 0."""
    value = int(raw)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {raw!r}")
    return value


def parse_nonempty(raw: str) -> str:
    """Strip the text; refuse an empty one."""
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def parse_seconds(raw: str) -> float:
    """Parse a finite number of seconds >= 0."""
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"expected a number of seconds >= 0, got {raw!r}")
    return value


def parse_rate(raw: str) -> float:
    """Parse a finite number > 0."""
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


def parse_path(raw: str) -> str:
    """Make a non-empty path absolute (against the current directory)."""
    return os.path.abspath(parse_nonempty(raw))


def parse_optional_path(raw: str) -> str | None:
    """Make a path absolute; empty text is None (unset)."""
    return os.path.abspath(raw.strip()) if raw.strip() else None


#: First path segments the gateway's own mounts use: a namespace may not start with one.
RESERVED_SEGMENTS = frozenset(("api", ".well-known", "metrics", "ready", "webdav"))


def parse_namespace(raw: str) -> str:
    """Check the path prefix files are named under (``/archive``: ``/archive/12345``); empty is none.

    >>> parse_namespace("/archive/")
    '/archive'
    >>> parse_namespace("")
    ''
    """
    value = raw.strip().rstrip("/")
    if not value:
        return ""
    segments = value.split("/")
    if segments[0] != "" or any(not part or part in (".", "..") for part in segments[1:]):
        raise ValueError(f"{raw!r} is not an absolute path like /archive (no empty, . or .. segments)")
    if any(c in value for c in "?#%;\\ ") or not value.isascii():
        raise ValueError(f"{raw!r} holds characters a URL path would have to encode")
    if segments[1] in RESERVED_SEGMENTS:
        raise ValueError(f"{raw!r} starts with /{segments[1]}, which the gateway serves itself")
    if segments[-1].isdigit():
        raise ValueError(f"{raw!r} ends in a number, which would read as a file id")
    return value


def parse_public_url(raw: str) -> str | None:
    """Check the URL clients reach the gateway at (its scheme and host, maybe a path); empty is unset.

    >>> parse_public_url("https://tape.example.org:8443/")
    'https://tape.example.org:8443'
    >>> parse_public_url("") is None
    True
    """
    value = raw.strip()
    if not value:
        return None
    scheme, sep, rest = value.partition("://")
    host = rest.partition("/")[0]
    if not sep or scheme.lower() not in ("http", "https") or not host or any(c in value for c in "?# "):
        raise ValueError(f"expected http(s)://HOST[:PORT][/PATH] with no query, got {value[:80]!r}")
    return value.rstrip("/")


def parse_dirs(raw: str) -> tuple[str, ...]:
    """Split a comma/newline separated list of existing directories, resolving links."""
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


def parse_urls(raw: str) -> tuple[str, ...]:
    """Split comma/space separated http(s) URLs (token issuers); trailing slashes are kept as given.

    >>> parse_urls("https://iam.example.org/, https://other.example.org")
    ('https://iam.example.org/', 'https://other.example.org')
    """
    urls = tuple(item for item in raw.replace(",", " ").split() if item)
    for url in urls:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest.partition("/")[0]:
            raise ValueError(f"{url!r} is not an http(s) URL")
    return urls


def parse_words(raw: str) -> tuple[str, ...]:
    """Split a comma/space separated list of words (audiences, groups)."""
    return tuple(item for item in raw.replace(",", " ").split() if item)


def parse_networks(raw: str) -> tuple[str, ...]:
    """Split a comma/space separated list of addresses or networks (``10.0.0.0/8``), checking each."""
    import ipaddress  # stdlib; only here

    found = []
    for item in raw.replace(",", " ").split():
        try:
            found.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(found)


#: What ``[identity] anonymous`` may grant a request that carries no token.
ANONYMOUS_LEVELS = ("none", "read", "stage", "all")


def parse_anonymous(raw: str) -> str | None:
    """Parse ``[identity] anonymous``; empty is unset (all on loopback without identity, else none)."""
    return one_of(*ANONYMOUS_LEVELS)(raw) if raw.strip() else None


def one_of(*choices: str) -> Callable[[str], str]:
    """Return a parser accepting only ``choices`` (any case)."""

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


#: Database URL schemes the gateway catalog accepts (peewee's playhouse.db_url names).
CATALOG_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")
#: The value of ``[archive] catalog`` that turns the catalog (and the inventory) off.
CATALOG_OFF = "off"
#: The catalog's default place, under the prefix: a hidden name, so listings and audits skip it.
DEFAULT_CATALOG_NAME = ".catalog.sqlite"
#: URL schemes a sideband database may have (Oracle HSM's is MySQL; SQLite is the embedded default).
SIDEBAND_SCHEMES = ("sqlite", "mysql")
#: The sideband database's default file, under ``sam_qfs_prefix``: hidden, so listings skip it.
DEFAULT_SIDEBAND_NAME = ".sideband.sqlite"
#: Who keeps the sideband database true: our tape library emulator, or a real HSM outside the gateway.
SIDEBAND_HSM_MODES = ("emulator", "external")
#: Where the bulk-staging scheduler runs: inside ``pacifica-like serve``, or only in ``pacifica-like worker``.
BULK_SCHEDULER_MODES = ("in-process", "off")
#: How the access log is written.
ACCESS_LOG_FORMATS = ("json", "text", "off")


def redact_url(url: str) -> str:
    """Hide the password in a database URL, for printing and logs.

    >>> redact_url("mysql://gw:s3cret@db:3306/archive")
    'mysql://gw:***@db:3306/archive'
    >>> redact_url("sqlite:////srv/catalog.sqlite")
    'sqlite:////srv/catalog.sqlite'
    """
    return re.sub(r"^([a-zA-Z0-9+]+://[^:/@]*):[^@/]*@", r"\1:***@", url)


def parse_catalog(raw: str) -> str:
    """Check a catalog database URL; make a SQLite path absolute; ``off`` disables the catalog.

    >>> parse_catalog("postgresql://gw@db.example:5432/archive")
    'postgresql://gw@db.example:5432/archive'
    >>> parse_catalog("sqlite:////srv/state/catalog.sqlite")
    'sqlite:////srv/state/catalog.sqlite'
    >>> parse_catalog(" Off ")
    'off'
    """
    value = parse_nonempty(raw)
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


def parse_sideband_url(raw: str) -> str:
    """Check a sideband database URL; make a SQLite path absolute.

    >>> parse_sideband_url("mysql://samdb:pw@db.example:3306/samqfs")
    'mysql://samdb:pw@db.example:3306/samqfs'
    """
    value = parse_catalog(raw)
    scheme = value.partition("://")[0].lower()
    if value == CATALOG_OFF or scheme not in SIDEBAND_SCHEMES:
        raise ValueError(
            f"expected sqlite:///PATH or mysql://user:password@host:port/schema, got {redact_url(value)!r}"
        )
    return value


# -- the sections ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveSettings:
    """The ``[archive]`` section: which backend, where, and its policies."""

    backend: str = setting(
        parse_nonempty,
        "posix",
        "storage backend: posix, tape (alias hpss), sideband (alias hsm_sideband) or memory",
        env="PAI_BACKEND_TYPE",
        flags=("-t", "--type"),
    )
    prefix: str = setting(
        parse_path,
        "./archive-data",
        "archive root directory (the disk cache); relative to the working directory",
        env="PAI_PREFIX",
        flags=("--prefix",),
    )
    use_id2filename: bool = setting(
        parse_bool,
        "true",
        "Pacifica's sharded layout (12345 -> 39/3039); false keeps flat names",
        env="PAI_USE_ID2FILENAME",
    )
    write_once: bool = setting(
        parse_bool,
        "false",
        "a second PUT or PATCH of an existing id is refused with 409",
        env="PAI_WRITE_ONCE",
    )
    allow_delete: bool = setting(
        parse_bool, "false", "DELETE removes files; false answers 405", env="PAI_ALLOW_DELETE"
    )
    require_last_modified: bool = setting(
        parse_bool,
        "false",
        "a PUT without Last-Modified is a 400; false stores it with the upload's start as its mtime",
        env="PAI_REQUIRE_LAST_MODIFIED",
    )
    patch_roots: tuple[str, ...] = setting(
        parse_dirs,
        "",
        "comma-separated directories PATCH may move files from",
        env="PAI_PATCH_ROOTS",
        unset="none (PATCH refused)",
    )
    #: Database URL of the gateway catalog (the inventory), None when it is off.
    catalog: str | None = setting(
        parse_catalog,
        None,
        "the gateway catalog (inventory, bulk requests): sqlite, postgresql or mysql URL, or off",
        env="PAI_CATALOG",
        unset="`sqlite:///<prefix>/.catalog.sqlite`",
        secret=True,
    )


@dataclass(frozen=True)
class TapeSettings:
    """The ``[tape]`` section: the emulated library, its cost model and recall policy.

    Sizes are bytes, rates MiB/s, times seconds before ``time_scale`` applies.
    """

    library: str = setting(
        parse_path,
        "./tape-library",
        "the emulated library's directory (volumes and catalog.sqlite)",
        env="PAI_TAPE_LIBRARY",
    )
    drives: int = setting(parse_positive, "2", "tape drives; created by tape init, which only ever adds")
    migration_drives: int = setting(
        parse_count,
        "0",
        "drives a migration writes with at once (one volume each); 0: all but one, so recalls keep a drive",
    )
    volumes: int = setting(parse_positive, "8", "volumes (cartridges); created by tape init")
    volume_capacity: int = setting(
        parse_size, "18TB", "bytes per volume; units B, KB/MB/GB/TB, KiB/MiB/GiB/TiB"
    )
    mount_seconds: float = setting(parse_seconds, "30", "robot exchange and load of a cartridge")
    unmount_seconds: float = setting(parse_seconds, "20", "rewind and unload of a cartridge")
    locate_seconds: float = setting(
        parse_seconds, "60", "a locate across the whole tape; shorter moves take proportionally less"
    )
    read_mib_s: float = setting(parse_rate, "381", "read rate per drive, MiB/s (LTO-9 class)")
    write_mib_s: float = setting(parse_rate, "381", "write rate per drive, MiB/s (LTO-9 class)")
    time_scale: float = setting(
        parse_seconds, "1.0", "multiplies every tape delay; 0 turns them off", env="PAI_TAPE_TIME_SCALE"
    )
    verify_after_write: bool = setting(
        parse_bool, "true", "migrate reads each new copy back; release needs a verified copy"
    )
    auto_stage: bool = setting(
        parse_bool,
        "false",
        "GET of an offline file recalls it instead of answering 503",
        env="PAI_TAPE_AUTO_STAGE",
    )
    stage_timeout: float = setting(
        parse_seconds, "60", "seconds POST waits for a recall before answering 202"
    )
    # Waiting clients must never hold every worker: beyond this many, POST answers 202 at once.
    stage_waiters: int = setting(
        parse_count, "2", "POSTs (all processes of this host) that may wait for a recall at once; 0: none"
    )
    stager: str | None = setting(
        parse_optional_path,
        "",
        "path of the compiled C stager (libstager.so)",
        env="PAI_TAPE_STAGER",
        unset="the one built with the package",
    )


@dataclass(frozen=True)
class SidebandSettings:
    """The ``[sideband]`` section: an Oracle-HSM-style sideband database beside a SAM-QFS mount.

    ``database`` None: not configured (the sideband backend then uses
    ``DEFAULT_SIDEBAND_NAME`` under ``sam_qfs_prefix``; see ``Settings.sideband_url``);
    ``sam_qfs_prefix`` None: the archive prefix.
    """

    database: str | None = setting(
        parse_sideband_url,
        None,
        "sideband database: sqlite:///PATH or mysql://user:password@host:port/schema",
        env="PAI_SIDEBAND_DATABASE",
        unset="`sqlite:///<sam_qfs_prefix>/.sideband.sqlite` (backend sideband only)",
        secret=True,
    )
    sam_qfs_prefix: str | None = setting(
        parse_optional_path,
        "",
        "the mounted SAM-QFS filesystem holding the files",
        env="PAI_SAM_QFS_PREFIX",
        unset="`[archive] prefix`",
    )
    hsm: str = setting(
        one_of(*SIDEBAND_HSM_MODES),
        "emulator",
        "who keeps the tables true: emulator (our tape library) or external (a real HSM)",
        env="PAI_SIDEBAND_HSM",
    )
    connect_timeout: float = setting(
        parse_rate, "5", "seconds to connect, read or write before a request gets a 503"
    )
    max_connections: int = setting(
        parse_positive, "32", "pooled database connections per process (keep above the threads using it)"
    )


@dataclass(frozen=True)
class BulkSettings:
    """The ``[bulk]`` section: the bulk-staging API's limits and its recall scheduler's policy.

    Times are seconds, sizes bytes; ``drives`` 0 means every drive of the library.
    """

    site_name: str = setting(
        parse_nonempty, "pacifica_like", "the name /.well-known/wlcg-tape-rest-api reports"
    )
    max_files_per_request: int = setting(
        parse_positive, "100000", "most files one request may name (more: 413)"
    )
    max_in_flight_per_client: int = setting(
        parse_positive,
        "1000000",
        "files of one client recalled or queued at once; more are accepted and wait (seen as SUBMITTED)",
    )
    min_poll_seconds: float = setting(
        parse_seconds, "1", "advertised: clients poll a request no more often than this"
    )
    scheduler: str = setting(
        one_of(*BULK_SCHEDULER_MODES),
        "in-process",
        "in-process: serve runs the recall scheduler; off: only pacifica-like worker does",
        env="PAI_BULK_SCHEDULER",
    )
    drives: int = setting(parse_count, "0", "drives all schedulers together may hold at once; 0: every drive")
    max_recalls_in_flight: int = setting(
        parse_positive, "64", "files being recalled at once, over every volume"
    )
    # A volume is mounted once its queue holds mount_min_files files or mount_min_bytes bytes, or
    # its oldest file has waited max_wait_seconds: small queues never starve.
    mount_min_files: int = setting(parse_positive, "32", "queued files that make a volume worth mounting")
    mount_min_bytes: int = setting(parse_size, "50GB", "queued bytes that make a volume worth mounting")
    max_wait_seconds: float = setting(
        parse_seconds, "300", "a volume's oldest queued file waits no longer than this for a mount"
    )
    # A free drive gains nothing by waiting the full max_wait_seconds for more files to gather.
    idle_wait_seconds: float = setting(
        parse_seconds,
        "2",
        "while a drive is free, a volume's oldest queued file waits no longer than this for a mount",
    )
    recall_timeout: float = setting(
        parse_seconds, "3600", "a recall running longer is failed by the watchdog, with that reason"
    )
    max_attempts: int = setting(parse_positive, "3", "tries per file before it is FAILED")
    #: FTS brings files online, then queues their transfers, which may wait hours: a short default
    #: pin lets the disk cache drop a file before FTS copies it (StoRM sites pin for 3 days).
    default_pin_seconds: float = setting(
        parse_seconds,
        "259200",
        "pin lifetime when a request gives no diskLifetime, or one that is no duration",
    )
    max_pin_seconds: float = setting(parse_seconds, "604800", "the longest pin lifetime granted")
    poll_seconds: float = setting(
        parse_rate, "1", "seconds between scheduler passes when there is nothing to do"
    )
    max_heavy_requests: int = setting(
        parse_positive, "2", "heavy requests served at once by all processes of this host (more: 429)"
    )
    heavy_wait_seconds: float = setting(
        parse_seconds,
        "30",
        "a heavy stage request waits this long for a slot before its 429 (FTS fails a refused job)",
    )
    heavy_request_files: int = setting(
        parse_positive,
        "1000",
        "files that make a request (archiveinfo, stage, cancel, release, a poll) heavy",
    )
    retention_seconds: float = setting(
        parse_seconds,
        "604800",
        "a finished request is forgotten this long after it finished, once none of its pins holds",
    )
    max_requests_per_client: int = setting(
        parse_positive,
        "1000",
        "requests a client may have open or pinning files (finished ones make room; more: 429)",
    )


@dataclass(frozen=True)
class IdentitySettings:
    """The ``[identity]`` section: who may do what (WLCG bearer tokens, service tokens, anonymous).

    Identity is configured when ``issuers`` or ``token_file`` is set. Without it the
    service serves loopback only, unless ``anonymous`` says what anyone may do.
    """

    issuers: tuple[str, ...] = setting(
        parse_urls, "", "token issuers trusted (WLCG JWT profile), comma separated", env="PAI_ISSUERS"
    )
    audiences: tuple[str, ...] = setting(
        parse_words,
        "",
        "audiences a token may name (https://wlcg.cern.ch/jwt/v1/any is always accepted)",
        env="PAI_AUDIENCES",
    )
    jwks_file: str | None = setting(
        parse_optional_path,
        "",
        "a local JWKS file with the issuers' keys (no key fetching over the network)",
        env="PAI_JWKS_FILE",
        unset="keys fetched from each issuer's discovery document",
    )
    token_file: str | None = setting(
        parse_optional_path,
        "",
        "the service tokens file (pacifica-like token create|list|revoke)",
        env="PAI_TOKEN_FILE",
        unset="no service tokens",
    )
    anonymous: str | None = setting(
        parse_anonymous,
        "",
        "what a request without a token may do: none, read, stage or all",
        env="PAI_ANONYMOUS",
        unset="all on loopback without identity, else none",
    )
    admin_groups: tuple[str, ...] = setting(
        parse_words,
        "",
        "wlcg.groups whose members may read /metrics, /api/v1/queues and any bulk request",
        env="PAI_ADMIN_GROUPS",
    )
    leeway: float = setting(parse_seconds, "60", "seconds of clock skew allowed on exp, nbf and iat")
    jwks_refresh_seconds: float = setting(
        parse_seconds, "3600", "an issuer's keys are fetched again after this long (and on an unknown kid)"
    )

    @property
    def configured(self) -> bool:
        """True when tokens can be checked (an issuer or a service tokens file)."""
        return bool(self.issuers or self.token_file)


@dataclass(frozen=True)
class ServerSettings:
    """The ``[server]`` section: where ``pacifica-like serve`` listens, how it reports."""

    address: str = setting(
        parse_nonempty, "127.0.0.1", "address serve listens on", env="PAI_ADDRESS", flags=("-a", "--address")
    )
    port: int = setting(parse_port, "8080", "port serve listens on", env="PAI_PORT", flags=("-p", "--port"))
    threads: int = setting(
        parse_positive, "16", "serve's request threads", env="PAI_THREADS", flags=("--threads",)
    )
    #: serve: connections held at once (each one descriptor; the open-file limit is raised to fit).
    connection_limit: int = setting(
        parse_positive, "4096", "serve only: connections held at once", env="PAI_CONNECTION_LIMIT"
    )
    #: serve: seconds a connection may send nothing before it is closed.
    idle_timeout: int = setting(
        parse_positive,
        "60",
        "serve only: seconds a connection may stay silent before it is closed",
        env="PAI_IDLE_TIMEOUT",
    )
    #: Sites that publish their files below a path (an RSE prefix) name them there on every door.
    namespace: str = setting(
        parse_namespace,
        "",
        "path prefix files are also named under: /archive serves /archive/<id>, /webdav/archive/<id> "
        "and Tape REST paths /archive/<id>",
        env="PAI_NAMESPACE",
        unset="none: /<id> only",
    )
    #: serve speaks HTTPS itself when given both (cheroot's TLS; production terminates TLS at nginx).
    tls_cert: str | None = setting(
        parse_optional_path,
        "",
        "serve only: PEM certificate (chain) to serve HTTPS with; needs tls_key",
        env="PAI_TLS_CERT",
        unset="plain HTTP",
    )
    tls_key: str | None = setting(
        parse_optional_path, "", "serve only: PEM private key of tls_cert", env="PAI_TLS_KEY", unset="none"
    )
    #: X-Forwarded-For is believed only from these (the TLS proxy in front); else the peer address counts.
    trusted_proxies: tuple[str, ...] = setting(
        parse_networks,
        "",
        "proxies whose X-Forwarded-For names the client (addresses or networks)",
        env="PAI_TRUSTED_PROXIES",
        unset="none: the connection's own address",
    )
    #: Behind a TLS proxy the request's own address is not the one clients use.
    public_url: str | None = setting(
        parse_public_url,
        "",
        "the URL clients reach the gateway at (a TLS proxy's); the Tape REST discovery uri uses it",
        env="PAI_PUBLIC_URL",
        unset="the URL the request came in on",
    )
    #: Directory shared by uWSGI workers for Prometheus counters (prometheus_client multiprocess mode).
    metrics_dir: str | None = setting(
        parse_optional_path,
        "",
        "uWSGI only: where worker processes keep their Prometheus counters",
        env="PROMETHEUS_MULTIPROC_DIR",
        unset="a fresh temp dir per uWSGI start",
    )
    #: serve: the file API's adapter over the same handlers (uWSGI always runs the WSGI one). serve
    #: mounts the MethodDispatcher resource, as a site's own CherryPy tree would; it costs about half
    #: of serve's 4 KiB GET rate (docs/decisions/0006-file-resource-under-serve.md), wsgi buys it back.
    file_api: str = setting(
        one_of("wsgi", "cherrypy"),
        "cherrypy",
        "serve only: file API adapter: cherrypy (MethodDispatcher resource) or wsgi (about 2x the GET rate)",
        env="PAI_FILE_API",
    )
    access_log: str = setting(
        one_of(*ACCESS_LOG_FORMATS),
        "json",
        "access log format: json (one object per line), text or off",
        env="PAI_ACCESS_LOG",
    )


#: Every section, in the order files are documented and ``check-config`` prints them.
SECTIONS: dict[str, type] = {
    "archive": ArchiveSettings,
    "tape": TapeSettings,
    "sideband": SidebandSettings,
    "bulk": BulkSettings,
    "server": ServerSettings,
    "identity": IdentitySettings,
}


def options(section: str) -> dict[str, Option]:
    """Return a section's keys and their options, in declaration order."""
    return {field.name: field.metadata[OPTION_KEY] for field in dataclasses.fields(SECTIONS[section])}
