# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both build .venv from scratch on a fresh machine; torch is pinned first so that pip takes the
# local CPU build instead of resolving a newer release with gigabytes of CUDA wheels.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/volunteer demo $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)
