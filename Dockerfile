# pacifica-like: the archive gateway, nginx in front of uWSGI, serving the /data volume on :8080.
#
# The install and entry steps are docker/install.sh and docker/entrypoint.sh,
# which tests/test_docker_scripts.py runs without Docker; keep the logic there
# rather than in RUN lines here, or it goes untested.
#
#   docker build -t pacifica-like .
#   docker run -p 8080:8080 -v archive:/data pacifica-like
#   docker run --rm pacifica-like check-config

# Build stage: uWSGI and the tape stager compile from source, so the compiler and
# the OpenSSL headers live only here (the slim runtime already has libssl3).
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libssl-dev \
    && rm -rf /var/lib/apt/lists/*
COPY . /src
# Extras to install, e.g. --build-arg PAI_EXTRAS=uwsgi,mysql for the MySQL driver.
ARG PAI_EXTRAS=uwsgi
RUN PAI_VENV=/opt/pacifica-like PAI_EXTRAS="${PAI_EXTRAS}" PIP_NO_CACHE_DIR=1 \
    /src/docker/install.sh /src

# Runtime stage: the same base, so the venv's interpreter and libpython paths
# match; only the venv (with the entrypoint and deploy/nginx inside it) is
# carried over. nginx is the production front (README "Production"): it holds
# slow clients and checks request framing before uWSGI sees a request. The
# entrypoint runs it unprivileged under uWSGI's master, so Debian's own nginx
# service, config and log directories go unused.
FROM python:3.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* \
    && /usr/sbin/nginx -v
COPY --from=build /opt/pacifica-like /opt/pacifica-like
# A fixed uid/gid lets operators chown host volumes to match. /data is created
# and owned here so a fresh named volume inherits the ownership.
RUN groupadd --system --gid 10001 archive \
    && useradd --system --uid 10001 --gid archive --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin archive \
    && mkdir -p /data \
    && chown archive:archive /data \
    && /opt/pacifica-like/bin/uwsgi --version
# PAI_PREFIX and PAI_BACKEND_TYPE are deliberately not set here: the entrypoint
# defaults them to /data and posix unless archive.ini (PAI_CONFIG) names them,
# which an ENV line would silently override.
# PAI_RUN_DIR: nginx.conf, nginx.pid and uWSGI's socket, reused across restarts of a container.
ENV PAI_VENV=/opt/pacifica-like \
    PAI_RUN_DIR=/tmp/pacifica-like-front \
    PATH=/opt/pacifica-like/bin:$PATH \
    PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 8080
# No curl in slim; the venv's Python asks the port nginx listens on (a 502 while uWSGI
# is down fails it too).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/opt/pacifica-like/bin/python", "-c", "import os, urllib.request; port = os.environ.get('PAI_LISTEN', ':8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=4)"]
USER archive
WORKDIR /data
ENTRYPOINT ["/opt/pacifica-like/docker/entrypoint.sh"]
