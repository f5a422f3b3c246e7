#!/usr/bin/env bash
# Install pacifica-like, with uWSGI, into a self-contained virtualenv.
#
# The Dockerfile runs this in its build stage and tests/test_docker_scripts.py
# runs it into a temporary directory, so the image's install step is tested
# without Docker. It needs no root: it writes only under $PAI_VENV and a
# temporary directory (the image's user is created by the Dockerfile).
#
# Usage: install.sh [SOURCE_DIR]
#   SOURCE_DIR   the project checkout (default: $PAI_SRC, else this script's repo)
#   PAI_VENV     where the virtualenv goes (default /opt/pacifica-like)
#   PAI_PYTHON   interpreter that creates it (default python3)
#   PAI_EXTRAS   extras to install (default uwsgi; e.g. "uwsgi,mysql")
# pip's own PIP_* variables (index, cache, proxy) are honoured as usual.
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
src=${1:-${PAI_SRC:-$(dirname -- "$here")}}
venv=${PAI_VENV:-/opt/pacifica-like}
python=${PAI_PYTHON:-python3}
extras=${PAI_EXTRAS:-uwsgi}

die() {
    echo "install.sh: $*" >&2
    exit 2
}

[[ -f "$src/setup.py" ]] || die "$src has no setup.py; pass the pacifica-like source directory"
[[ -f "$src/docker/entrypoint.sh" ]] || die "$src/docker/entrypoint.sh is missing"
[[ -f "$src/deploy/nginx/pacifica-like.conf" ]] || die "$src/deploy/nginx/pacifica-like.conf is missing"

# setuptools writes build/ and *.egg-info into the tree it builds (the
# checkout's egg-info may even be tracked), and a stale build/lib can leak
# deleted modules into the wheel, so build a copy. Copy only what the build
# reads: packaging files and the top-level packages, minus hidden entries and
# caches; a working tree may also hold venvs, archives and benchmark output of
# any size, still being written. Add any top-level file setup.py starts
# reading to the list below.
parts=(docker/entrypoint.sh deploy/nginx)
for path in "$src"/setup.py "$src"/setup.cfg "$src"/pyproject.toml "$src"/MANIFEST.in \
    "$src"/README* "$src"/LICENSE* "$src"/requirements*.txt "$src"/*/__init__.py; do
    # Unmatched globs and absent names stay literal; skip them.
    if [[ -e "$path" ]]; then
        relative=${path#"$src"/}
        parts+=("${relative%/__init__.py}")
    fi
done
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
staging="$work/src"
mkdir "$staging"
# tar's status 1 means only "a file changed while being read" (say, a log in a
# package directory); the sources themselves are not being edited mid-install.
tar -C "$src" --exclude='.*' --exclude=__pycache__ --exclude='*.pyc' \
    -cf "$work/source.tar" "${parts[@]}" \
    || [[ $? -eq 1 ]] || die "could not copy the sources from $src"
tar -C "$staging" -xf "$work/source.tar"

echo "install.sh: installing ${src}[${extras}] into $venv"
"$python" -m venv "$venv"
# Not --upgrade-deps or a pip self-upgrade: the build must work from whatever
# index PIP_* points at, including an offline mirror without pip itself.
"$venv/bin/python" -m pip install --disable-pip-version-check "${staging}[${extras}]"

# The entrypoint and the nginx settings it includes travel inside the venv, so
# the runtime stage gets them with the single COPY of the venv, and the test
# runs the very files the image runs.
install -d "$venv/docker" "$venv/deploy/nginx"
install -m 0755 "$staging/docker/entrypoint.sh" "$venv/docker/entrypoint.sh"
install -m 0644 "$staging"/deploy/nginx/*.conf "$venv/deploy/nginx/"

# Fail the build here, not at first start, if the server cannot run.
"$venv/bin/uwsgi" --version >/dev/null || die "uwsgi in $venv does not run"
"$venv/bin/python" -c "import pacifica_like.wsgi" || die "pacifica_like.wsgi does not import"
"$venv/bin/pacifica-like" --version
