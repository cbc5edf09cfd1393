# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both build .venv from scratch on a fresh machine; torch is installed first, pinned, from the index
# that fits the machine: PyTorch's CPU index where nvidia-smi finds no GPU (PyPI's Linux torch is the
# CUDA build, gigabytes of nvidia-* wheels), PyPI where it does. `make test TORCH_INDEX=` forces PyPI;
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 (say) picks another of PyTorch's indexes.
# --retries 2: where that index cannot be reached but pip has local wheels (find-links), pip's five
# retries a package cost 76 s before it fell back to them; two cost 6 s.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(shell nvidia-smi -L >/dev/null 2>&1 || echo $(TORCH_CPU_INDEX))

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --retries 2 torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: demo test wheel
demo: $(VENV)/.installed
	$(VENV)/bin/volunteer demo $(ARGS)

# TEST_JOBS workers (pytest-xdist), each taking whole files (--dist loadfile: a file's module-scoped
# seed and lab stay on one worker), in collection order (--no-loadscope-reorder): tests/conftest.py puts
# the slowest files first, where xdist's own order (most tests first) left them for last.
# TEST_JOBS=0 runs the suite in this process, one test at a time.
TEST_JOBS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder) $(ARGS)

# The release artifact: dist/hivemind_volunteer-<version>-py3-none-any.whl, without dependencies
# (torch is chosen where it is installed; see the README's "Install").
wheel: | $(PY)
	rm -f dist/hivemind_volunteer-*.whl
	$(PY) -m pip wheel -q --no-deps -w dist .
