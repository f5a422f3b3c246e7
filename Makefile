# The project's entry points: CI runs exactly what a developer runs.
#   make run    install into .venv and serve on 127.0.0.1:8080 (data in ./archive-data)
#   make test   install test dependencies, lint, run every test (live servers included)
#   make bench  compare against pacifica-archiveinterface 0.4.2 under uWSGI

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: run test lint bench clean

# One stamp per install set, so `make run` does not compile uWSGI.
$(VENV)/.installed: setup.py pyproject.toml pacifica_like/storage/tape/stager.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@test -e /usr/include/mariadb/mysql.h && command -v pkg-config >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmariadb-dev pkg-config)
	$(PY) -m pip install --quiet -e '.[test,uwsgi]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/pacifica-like serve

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light)
	@command -v gfal-bringonline >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			gfal2 gfal2-plugin-http python3-gfal2 python3-gfal2-util gfal2-util-scripts)
	@command -v davix-ls >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq davix)
	$(PY) -m pytest

bench: $(VENV)/.installed-test
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info bench/.peer-venv
