#!/usr/bin/env bash
# Entry point of the pacifica-like image.
#
#   entrypoint.sh [UWSGI_OPTION...]        run the gateway (the default)
#   entrypoint.sh [pacifica-like] COMMAND  run a pacifica-like sub-command instead,
#                                          e.g. check-config, serve
#
# An argument list that starts with an option ("-...") or is empty means the
# server, and the options are appended to the uWSGI command line; anything
# else is a sub-command, so maintenance commands added to the CLI later work
# here without touching this script.
#
# The server is the production shape (README "Production", docs/decisions/0003):
# nginx on PAI_LISTEN holds the clients and hands complete, de-chunked requests
# to uWSGI on a unix socket in a private runtime directory. nginx runs as a
# daemon of uWSGI's master (--attach-daemon2), so the two start and stop as one
# process tree, and it runs unprivileged: no `user` directive, pid file and
# small temp paths in the runtime directory, error log on stderr. Without nginx
# the script stops: uWSGI's own HTTP socket would refuse chunked uploads (411)
# and let a few slow clients hold every worker.
#
# Environment (defaults suit the image):
#   PAI_VENV          the virtualenv install.sh made (default: the one holding this
#                     script, else /opt/pacifica-like)
#   PAI_PREFIX        archive root (default /data, unless archive.ini names one)
#   PAI_BACKEND_TYPE  storage backend (default posix)
#   PAI_LISTEN        where nginx listens: :PORT (all IPv4 interfaces; default :8080),
#                     HOST:PORT, [IPv6]:PORT or a unix socket path (the image's
#                     HEALTHCHECK needs a port)
#   PAI_PROCESSES     uWSGI worker processes (default 4)
#   PAI_RUN_DIR       private runtime directory: nginx.conf, nginx.pid, uwsgi.sock
#                     (default: a fresh mktemp -d under TMPDIR; the image sets
#                     /tmp/pacifica-like-front). Created 0700; must be ours and
#                     writable by nobody else.
#   PAI_UPLOAD_TEMP   where nginx buffers request bodies and slow responses
#                     (default <archive prefix>/.pacifica-like-uploads: the archive's
#                     filesystem has room for the largest upload, and a hidden entry
#                     is no archive file). nginx unlinks its temp files on creation,
#                     so nothing there outlives the process holding it.
#   PAI_NGINX         the nginx binary (default: nginx on PATH, else /usr/sbin/nginx)
#   PAI_NGINX_WORKERS nginx worker processes (default 2; each holds thousands of clients)
# plus every PAI_* setting pacifica_like/core/config.py reads.
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
from pacifica_like.core.config import ConfigError, load_settings

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
# uWSGI workers serve the bulk API but run no recall scheduler: a backend that locates files
# on tape (bulk requests queue its offline files at their positions) gets one
# `pacifica-like worker` beside them, unless [bulk] scheduler = off or there is no catalog.
# The class is the variant the settings pick (sideband: emulated or external HSM); the external
# HSM holds no drives, but its queued files still wait for the worker to stage them one by one.
import dataclasses
from pacifica_like.core.config import ConfigError
from pacifica_like.storage import registry
from pacifica_like.storage.contract import LocatesOnTape
effective = dataclasses.replace(settings, archive=dataclasses.replace(settings.archive, backend=backend))
try:
    recalls = issubclass(registry.backend_class(effective), LocatesOnTape)
except ConfigError:
    recalls = False
wanted = recalls and settings.bulk.scheduler == "in-process" and settings.archive.catalog is not None
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

# The front. Paths that reach uWSGI's --attach-daemon2 go through its key=value,
# comma-separated parser and then `sh -c`, so they are kept to plain characters.
plain='^[A-Za-z0-9._/+@-]+$'
nginx=${PAI_NGINX:-$(command -v nginx || true)}
if [[ -z "$nginx" && -x /usr/sbin/nginx ]]; then
    nginx=/usr/sbin/nginx
fi
[[ -n "$nginx" && -x "$nginx" && ! -d "$nginx" ]] \
    || die "nginx not found${PAI_NGINX:+ at $PAI_NGINX}: the gateway runs behind nginx" \
        "(the image installs nginx-light; elsewhere apt-get install nginx-light, or set PAI_NGINX)"
[[ "$nginx" =~ $plain ]] || die "nginx path $nginx: use a path of letters, digits and ._/+@- only"
site="$PAI_VENV/deploy/nginx/pacifica-like.conf"
[[ -f "$site" ]] || die "$site is missing (install with docker/install.sh, which copies deploy/nginx)"

if [[ -n "${PAI_RUN_DIR:-}" ]]; then
    run_dir=$PAI_RUN_DIR
    [[ -d "$run_dir" ]] || mkdir -m 0700 -- "$run_dir" 2>/dev/null \
        || die "cannot create runtime directory $run_dir (PAI_RUN_DIR) as $user"
else
    run_dir=$(mktemp -d "${TMPDIR:-/tmp}/pacifica-like-front.XXXXXX") \
        || die "cannot create a runtime directory in ${TMPDIR:-/tmp} (set PAI_RUN_DIR)"
fi
run_dir=$(cd -- "$run_dir" && pwd -P) || die "cannot enter runtime directory $run_dir as $user"
[[ "$run_dir" =~ $plain ]] || die "runtime directory $run_dir: use a path of letters, digits and ._/+@- only"
# The socket and nginx.conf live here: nobody else may replace them.
[[ -O "$run_dir" ]] || die "runtime directory $run_dir is not owned by $user"
[[ -z "$(find "$run_dir" -maxdepth 0 -perm /022)" ]] \
    || die "runtime directory $run_dir is writable by others (chmod 0700 it, or set PAI_RUN_DIR)"

# Request bodies are buffered whole before a worker sees them: on the archive's filesystem
# they have the room the archive has, and the prefix's listing skips hidden entries.
uploads=${PAI_UPLOAD_TEMP:-$data_dir/.pacifica-like-uploads}
[[ -d "$uploads" ]] || mkdir -m 0700 -- "$uploads" 2>/dev/null \
    || die "cannot create the upload buffer directory $uploads as $user (set PAI_UPLOAD_TEMP)"
probe=$(mktemp -p "$uploads" .entrypoint-probe.XXXXXX 2>/dev/null) \
    || die "upload buffer directory $uploads is not writable by $user (set PAI_UPLOAD_TEMP)"
rm -f -- "$probe"
# Nothing to sweep there: nginx unlinks each temp file as soon as it creates it, so a
# front killed mid-upload leaves no name behind, and its space returns with the process.

listen=${PAI_LISTEN:-:8080}
socket="$run_dir/uwsgi.sock"
# Secure by default: nginx on a non-loopback address needs identity or an explicit PAI_ANONYMOUS.
"$PAI_VENV/bin/python" -m pacifica_like.identity.access --listen "$listen" \
    || die "refusing to serve $listen to anyone without identity (see the message above)"
"$PAI_VENV/bin/python" -m pacifica_like.web.nginxfront --listen "$listen" --upstream "$socket" \
    --workdir "$run_dir" --site "$site" --upload-dir "$uploads" \
    --workers "${PAI_NGINX_WORKERS:-2}" >"$run_dir/nginx.conf" \
    || die "cannot write the nginx configuration (PAI_LISTEN=$listen, PAI_NGINX_WORKERS)"
front=("$nginx" -c "$run_dir/nginx.conf" -p "$run_dir/" -e stderr)
# A configuration nginx refuses stops here, with its own message, before uWSGI forks anything.
"${front[@]}" -t -q || die "nginx refused $run_dir/nginx.conf (above)"

# nginx runs in the foreground under uWSGI's master, which restarts it if it dies and
# stops it on exit (SIGTERM to the daemon's process group: nginx closes at once, the
# workers behind it are stopping too). The shell around nginx keeps that group whole:
# it waits for nginx's master through a stop, and when the master dies any other way
# (kill -9, the OOM killer) it kills the workers left behind, which would otherwise
# hold the port against the master uWSGI starts next, and outlive uWSGI. No ',' or '='
# in it: uWSGI's key=value parser reads the option.
supervised="${front[*]} & trap 'kill -TERM \$! && wait' TERM; wait; kill -KILL 0"
daemons=(--attach-daemon2 "cmd=$supervised,stopsignal=15")
# The bulk-staging recall scheduler, as a daemon uWSGI starts, restarts if it dies, and stops.
if [[ "$scheduler" == 1 ]]; then
    daemons+=(--attach-daemon2 "cmd=$PAI_VENV/bin/pacifica-like worker,stopsignal=15")
fi

echo "entrypoint: $backend archive at $data_dir; nginx on $listen in front of uWSGI on $socket" >&2
# --buffer-size: nginx passes request heads up to 4 x 8 KiB; uWSGI's 4 KiB default would drop them.
exec "$PAI_VENV/bin/uwsgi" \
    --socket "$socket" \
    --chmod-socket=600 \
    --master \
    --processes "${PAI_PROCESSES:-4}" \
    --module pacifica_like.wsgi \
    --need-app \
    --enable-threads \
    --die-on-term \
    --disable-logging \
    --socket-timeout 60 \
    --buffer-size 65535 \
    "${daemons[@]}" \
    "$@"
