# fr_distill developer entry points. Each target creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_ARGS ?=

.PHONY: install test test-fast demo bench clean-venv

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[all]' $(TORCH_PINS)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# the suite without the end-to-end runs (slow) and the torchrun process groups (dist)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not dist" tests

demo: $(STAMP)
	$(PY) tools/demo.py $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) tools/benchmark.py all

clean-venv:
	rm -rf $(VENV)
