#!/usr/bin/env bash
# Entry point of the pacifica-like image.
#
#   entrypoint.sh [UWSGI_OPTION...]        run the gateway under uWSGI (the default)
#   entrypoint.sh [pacifica-like] COMMAND  run a pacifica-like sub-command instead,
#                                          e.g. check-config, serve
#
# An argument list that starts with an option ("-...") or is empty means the
# server, and the options are appended to the uWSGI command line; anything
# else is a sub-command, so maintenance commands added to the CLI later work
# here without touching this script.
#
# Environment (defaults suit the image):
#   PAI_VENV          the virtualenv install.sh made (default: the one holding this
#                     script, else /opt/pacifica-like)
#   PAI_PREFIX        archive root (default /data, unless archive.ini names one)
#   PAI_BACKEND_TYPE  storage backend (default posix)
#   PAI_LISTEN        uWSGI --http-socket address (default :8080, all interfaces)
#   PAI_PROCESSES     uWSGI worker processes (default 4)
# plus every PAI_* setting pacifica_like/config.py reads.
#
# The Dockerfile's ENTRYPOINT is this file as install.sh copies it into the
# venv, and tests/test_docker_scripts.py runs that same copy outside Docker.
set -euo pipefail

die() {
    echo "entrypoint: $*" >&2
    exit 1
}

# install.sh puts this script at $PAI_VENV/docker/, so a copy in a venv finds
# its own venv; the fixed path covers the image and a checkout next to it.
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
if [[ -z "${PAI_VENV:-}" ]]; then
    if [[ -x "$here/../bin/pacifica-like" ]]; then
        PAI_VENV=$(dirname -- "$here")
    else
        PAI_VENV=/opt/pacifica-like
    fi
fi
export PAI_VENV
[[ -x "$PAI_VENV/bin/pacifica-like" ]] || die "no pacifica-like in $PAI_VENV (set PAI_VENV to install.sh's venv)"

# Image defaults: the archive lives on the /data volume (the app's own default,
# ./archive-data, is relative to whatever the working directory happens to be)
# and uses the posix backend. They are exported as PAI_* variables, which beat
# archive.ini, so they apply only to keys neither the environment nor the file
# given by PAI_CONFIG names; the config loader itself decides that. It prints
# NAME=value lines: defaults to export, then the effective BACKEND and DATA_DIR.
# A bad setting stops here, before uWSGI forks anything.
resolve_settings() {
    "$PAI_VENV/bin/python" -c '
import sys
from pacifica_like.config import ConfigError, load_settings

IMAGE_DEFAULTS = {"backend": ("PAI_BACKEND_TYPE", "posix"), "prefix": ("PAI_PREFIX", "/data")}
try:
    settings = load_settings()
except ConfigError as exc:
    sys.exit(f"entrypoint: configuration error: {exc}")
named = {key for section, key in settings.sources if section == "archive"}
for key, (variable, value) in IMAGE_DEFAULTS.items():
    if key not in named:
        print(f"{variable}={value}")
backend = settings.archive.backend if "backend" in named else IMAGE_DEFAULTS["backend"][1]
prefix = settings.archive.prefix if "prefix" in named else IMAGE_DEFAULTS["prefix"][1]
print(f"BACKEND={backend}")
print(f"DATA_DIR={prefix}")
# uWSGI workers serve the bulk API but run no recall scheduler: a tape-backed archive gets
# one `pacifica-like worker` beside them, unless [bulk] scheduler = off or there is no catalog.
from backends import factory
from backends.tape.backend import TapeBackend
try:
    tape_backed = issubclass(factory.resolve(backend), TapeBackend)
except KeyError:
    tape_backed = False
wanted = tape_backed and settings.bulk.scheduler == "in-process" and settings.archive.catalog is not None
print(f"SCHEDULER={1 if wanted else 0}")
'
}
resolved=$(resolve_settings)
backend=""
data_dir=""
scheduler=0
while IFS='=' read -r name value; do
    case "$name" in
        PAI_BACKEND_TYPE | PAI_PREFIX) export "$name=$value" ;;
        BACKEND) backend=$value ;;
        DATA_DIR) data_dir=$value ;;
        SCHEDULER) scheduler=$value ;;
        *) die "unexpected settings line: $name=$value" ;;
    esac
done <<<"$resolved"
[[ -n "$backend" && -n "$data_dir" ]] || die "could not resolve the backend and archive prefix"

# Sub-commands see the same settings but manage the data dir themselves
# (check-config must not create it). Spelling out "pacifica-like" is optional.
if [[ "${1:-}" == pacifica-like ]]; then
    shift
    exec "$PAI_VENV/bin/pacifica-like" "$@"
elif [[ $# -gt 0 && "$1" != -* ]]; then
    exec "$PAI_VENV/bin/pacifica-like" "$@"
fi

# uWSGI workers create the prefix lazily on their first request, so a bad
# volume would otherwise surface as a 500 long after start. Check it now.
# Only the last component is created: a missing parent usually means a volume
# mounted at the wrong path, which mkdir -p would paper over.
uid=$(id -u)
gid=$(id -g)
user="uid $uid gid $gid"
if [[ ! -d "$data_dir" ]]; then
    parent=$(dirname -- "$data_dir")
    [[ -d "$parent" ]] || die "data directory $data_dir: parent $parent does not exist" \
        "(mount a volume there or set PAI_PREFIX)"
    mkdir -- "$data_dir" 2>/dev/null \
        || die "cannot create data directory $data_dir: $parent is not writable by $user"
fi
# Probe with a real file rather than [[ -w ]]: -w trusts mode bits, which
# root-squashed NFS, ACLs and SELinux labels can contradict.
probe=$(mktemp -p "$data_dir" .entrypoint-probe.XXXXXX 2>/dev/null) \
    || die "data directory $data_dir is not writable by $user" \
        "(chown it, or mount the volume read-write)"
rm -f -- "$probe"

# The bulk-staging recall scheduler, as a daemon uWSGI starts, restarts if it dies, and stops.
daemon=()
if [[ "$scheduler" == 1 ]]; then
    daemon=(--attach-daemon2 "cmd=$PAI_VENV/bin/pacifica-like worker,stopsignal=15")
fi

echo "entrypoint: $backend archive at $data_dir, uWSGI on ${PAI_LISTEN:-:8080}" >&2
exec "$PAI_VENV/bin/uwsgi" \
    --http-socket "${PAI_LISTEN:-:8080}" \
    --master \
    --processes "${PAI_PROCESSES:-4}" \
    --module pacifica_like.wsgi \
    --need-app \
    --enable-threads \
    --die-on-term \
    --disable-logging \
    --socket-timeout 60 \
    --chunked-input-limit 16777216 \
    --add-header "Connection: close" \
    "${daemon[@]}" \
    "$@"
