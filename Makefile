# `make test` and `make demo` set everything up on a fresh machine: a .venv made with python3 -m venv,
# the pinned dependencies (torch==2.13.0 CPU held by a constraints file), and this package.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
REQS   := requirements/base.txt requirements/nodeps.txt requirements/constraints.txt pyproject.toml

.PHONY: install lint test demo tiny-model clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(REQS)
	$(PIP) install --quiet -c requirements/constraints.txt -r requirements/base.txt
	@if grep -qv '^\s*\(#\|$$\)' requirements/nodeps.txt; then \
		$(PIP) install --quiet --no-deps -c requirements/constraints.txt -r requirements/nodeps.txt; fi
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "from selfforcing.accel.cpu.native import main; main()"  # the C++ blocks (~1 min, then cached)
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/selfforcing demo

tiny-model: $(STAMP)
	scripts/train_tiny_pipeline.sh

clean-venv:
	rm -rf $(VENV)
