"""Settings from archive.ini, PAI_* environment variables and command-line flags.

The only module that reads the environment. Every key is declared once, in
:mod:`pacifica_like.core.settings_schema`; this module derives the rest from
those declarations: validation of files, variables and flags, ``check-config``'s
listing and the README's configuration table (``python -m
pacifica_like.core.config --markdown`` prints it, ``--update README.md``
rewrites it between its markers). Precedence is flags > env > file >
defaults, every source is honoured, and each value remembers where it came
from so a bad one fails at start naming the file and key (or the variable or
flag). Nothing is read at import: callers ask for :func:`load_settings` when
they start, which keeps uWSGI's pre-fork import free of I/O and lets tests
build as many differently-configured apps as they like.
"""

from __future__ import annotations

import argparse
import configparser
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pacifica_like.core.settings_schema import (
    ACCESS_LOG_FORMATS,
    BULK_SCHEDULER_MODES,
    CATALOG_OFF,
    CATALOG_SCHEMES,
    DEFAULT_CATALOG_NAME,
    DEFAULT_SIDEBAND_NAME,
    SECTIONS,
    SIDEBAND_HSM_MODES,
    SIDEBAND_SCHEMES,
    ArchiveSettings,
    BulkSettings,
    IdentitySettings,
    Option,
    ServerSettings,
    SidebandSettings,
    TapeSettings,
    options,
    parse_size,
    redact_url,
)

__all__ = [
    "ACCESS_LOG_FORMATS",
    "BULK_SCHEDULER_MODES",
    "CATALOG_OFF",
    "CATALOG_SCHEMES",
    "CONFIG_ENV",
    "CPCONFIG_ENV",
    "DEFAULT_CATALOG_NAME",
    "DEFAULT_SIDEBAND_NAME",
    "SCHEMA",
    "SIDEBAND_HSM_MODES",
    "SIDEBAND_SCHEMES",
    "ArchiveSettings",
    "BulkSettings",
    "ConfigError",
    "IdentitySettings",
    "Option",
    "ServerSettings",
    "Settings",
    "SidebandSettings",
    "TapeSettings",
    "describe",
    "flag_options",
    "load_settings",
    "parse_size",
    "redact_url",
    "settings_table",
]


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message names its source."""


#: section -> key -> Option, derived from the declarations. A key not listed here is an error.
SCHEMA: dict[str, dict[str, Option]] = {section: options(section) for section in SECTIONS}

CONFIG_ENV = "PAI_CONFIG"
CPCONFIG_ENV = "PAI_CPCONFIG"


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to build the app; immutable once loaded."""

    archive: ArchiveSettings
    server: ServerSettings
    tape: TapeSettings = field(default_factory=TapeSettings)
    sideband: SidebandSettings = field(default_factory=SidebandSettings)
    bulk: BulkSettings = field(default_factory=BulkSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
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

    ``flags`` maps section -> key -> value, None meaning unset: a string is
    parsed like the file's text, anything else is taken as already typed.
    ``config_file`` beats ``PAI_CONFIG``. Raises ConfigError naming the
    source of the first bad value.
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get(CONFIG_ENV) or None
    cpconfig_file = cpconfig_file or env.get(CPCONFIG_ENV) or None
    if cpconfig_file is not None and not os.path.isfile(cpconfig_file):
        raise ConfigError(f"CherryPy config {cpconfig_file}: no such file")

    values: dict[tuple[str, str], Any] = {}
    sources: dict[tuple[str, str], str] = {}
    for section, key, option in _declared():
        values[section, key] = option.default_value()

    if config_file is not None:
        for (section, key), raw in _read_ini(config_file).items():
            where = f"{config_file} [{section}] {key}"
            values[section, key] = _convert(SCHEMA[section][key], raw, where)
            sources[section, key] = where

    for section, key, option in _declared():
        if option.env and env.get(option.env) is not None:
            where = f"environment variable {option.env}"
            values[section, key] = _convert(option, env[option.env], where)
            sources[section, key] = where

    for section, given in (flags or {}).items():
        for key, value in given.items():
            if value is None:
                continue
            if key not in SCHEMA.get(section, {}):
                raise ConfigError(f"command-line flag for [{section}] {key}: unknown setting")
            where = f"command-line flag for [{section}] {key}"
            values[section, key] = (
                _convert(SCHEMA[section][key], value, where) if isinstance(value, str) else value
            )
            sources[section, key] = where

    found = {section: {key: values[section, key] for key in SCHEMA[section]} for section in SCHEMA}
    archive, tape = found["archive"], found["tape"]
    # Typed flags skip the parser, so paths are made absolute here whatever their source.
    archive["prefix"] = os.path.abspath(archive["prefix"])
    tape["library"] = os.path.abspath(tape["library"])
    if archive["catalog"] is None:
        # Beside the data it describes, whatever directory a command runs in (audits run anywhere).
        archive["catalog"] = "sqlite:///" + os.path.join(archive["prefix"], DEFAULT_CATALOG_NAME)
    elif archive["catalog"] == CATALOG_OFF:
        archive["catalog"] = None
    archive["patch_roots"] = _check_patch_roots(archive, tape, found["sideband"], sources)
    return Settings(
        archive=ArchiveSettings(**archive),
        server=ServerSettings(**found["server"]),
        tape=TapeSettings(**tape),
        sideband=SidebandSettings(**found["sideband"]),
        bulk=BulkSettings(**found["bulk"]),
        identity=IdentitySettings(**found["identity"]),
        config_file=config_file,
        cpconfig_file=cpconfig_file,
        sources=sources,
    )


def _declared() -> Iterator[tuple[str, str, Option]]:
    """Yield every declared key as (section, key, option), in declaration order."""
    for section, keys in SCHEMA.items():
        for key, option in keys.items():
            yield section, key, option


def flag_options(*sections: str) -> list[tuple[str, str, Option]]:
    """Return the keys of ``sections`` that have command-line flags, as (section, key, option)."""
    return [(s, key, option) for s, key, option in _declared() if s in sections and option.flags]


def flag_values(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Return the ``flags`` argument of :func:`load_settings` from parsed flags (dest = the key)."""
    given: dict[str, dict[str, Any]] = {}
    for section, key, option in _declared():
        if option.flags:
            given.setdefault(section, {})[key] = getattr(args, key, None)
    return given


def add_flags(parser: argparse.ArgumentParser, *sections: str, **choices: Sequence[str]) -> None:
    """Add the declared flags of ``sections`` to ``parser``; values arrive as text, parsed on load."""
    for _, key, option in flag_options(*sections):
        parser.add_argument(
            *option.flags,
            dest=key,
            choices=choices.get(key),
            metavar=None if key in choices else key.upper(),
            help=f"{option.help} (default {_shown_default(option, markdown=False)}"
            + (f"; env {option.env})" if option.env else ")"),
        )


def describe(settings: Settings) -> Iterator[tuple[str, str, Any, str]]:
    """Yield (section, key, value, source) for every key; URLs that may hold a password redacted."""
    for section, key, option in _declared():
        value = getattr(getattr(settings, section), key)
        if option.secret and value:
            value = redact_url(value)
        yield section, key, value, settings.source_of(section, key)


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


# -- the README's configuration table, generated from the declarations ---------------------------

#: The README lines the generated table sits between; everything between them is replaced.
TABLE_BEGIN = (
    "<!-- BEGIN settings table: generated from pacifica_like/core/settings_schema.py by "
    "`python -m pacifica_like.core.config --update README.md`; edit the declarations, not this table -->"
)
TABLE_END = "<!-- END settings table -->"


def _shown_default(option: Option, markdown: bool = True) -> str:
    if option.default:
        return f"`{option.default}`" if markdown else option.default
    text = option.unset or "none"
    return text if markdown else text.replace("`", "")


def settings_table() -> str:
    """Return the Markdown table of every key: file key, env variable, flags, default, meaning."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "| setting (`archive.ini`) | env | flag | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for section, key, option in _declared():
        env = f"`{option.env}`" if option.env else ""
        flags = ", ".join(f"`{flag}`" for flag in option.flags)
        default = cell(_shown_default(option))
        lines.append(f"| `[{section}] {key}` | {env} | {flags} | {default} | {cell(option.help)} |")
    return "\n".join(lines) + "\n"


def table_in(text: str) -> str:
    """Return what lies between the table markers of a README's text; ValueError if they are missing."""
    begin, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if begin < 0 or end < begin:
        raise ValueError(f"no settings table markers (expected {TABLE_BEGIN!r} ... {TABLE_END!r})")
    return text[begin + len(TABLE_BEGIN) : end].strip("\n") + "\n"


def with_table(text: str) -> str:
    """Return a README's text with the table between its markers replaced by :func:`settings_table`."""
    table_in(text)  # the markers must be there
    head, rest = text.split(TABLE_BEGIN, 1)
    tail = rest.split(TABLE_END, 1)[1]
    return f"{head}{TABLE_BEGIN}\n{settings_table()}{TABLE_END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the settings table (``--markdown``) or rewrite it in a README (``--update FILE``)."""
    parser = argparse.ArgumentParser(
        prog="python -m pacifica_like.core.config", description="The settings table, from the declarations."
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="print the Markdown table")
    what.add_argument("--update", metavar="README", help="replace the table between the markers in README")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(settings_table())
        return 0
    with open(args.update, encoding="utf-8") as handle:
        text = handle.read()
    try:
        updated = with_table(text)
    except ValueError as exc:
        parser.error(f"{args.update}: {exc}")
    if updated != text:
        with open(args.update, "w", encoding="utf-8") as handle:
            handle.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
