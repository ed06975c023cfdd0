# Two commands on a fresh machine: `make train` and `make test`. Both build .venv on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.py
WORKDIR ?= runs/tiny
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv train test test-gpu clean-venv

# The package itself (editable) with the test tools, at the versions of requirements.txt, in a venv of
# the first Python >= 3.12 among python3.12, python3 and any pyenv-installed 3.12+ (pyenv shims can
# exist for versions that are not active, so each candidate is run, not only looked up).
$(VENV)/.installed: pyproject.toml requirements.txt
	@set -e; found=""; py=""; \
	for c in python3.12 python3 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python3 2>/dev/null); do \
	  v=$$($$c -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || { found="$$found $$c(not runnable)"; continue; }; \
	  found="$$found $$c($$v)"; \
	  if $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py=$$c; break; fi; \
	done; \
	if [ -z "$$py" ]; then echo "drt-jax needs Python >= 3.12; found:$${found:- nothing}" >&2; exit 1; fi; \
	if [ ! -x $(PY) ]; then echo "creating $(VENV) with $$py"; $$py -m venv $(VENV); fi; \
	$(PY) -m pip install -q --upgrade pip >/dev/null; \
	$(PY) -m pip install -q -e '.[dev]' -c requirements.txt; \
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) -m drt_jax.train --config $(CONFIG) --workdir $(WORKDIR) $(ARGS)

test: venv
	$(PY) -m pytest -n 2 --dist loadscope -q $(PYTEST_ARGS)

# On a GPU machine (its own CUDA jax, or `pip install -e '.[cuda,dev]' -c requirements.txt`).
test-gpu:
	python3 -m pytest -q -m gpu $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
