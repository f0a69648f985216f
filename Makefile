# One-command entry points. Each target creates the virtualenv in .venv if needed.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
ARGS ?=
# torch is pinned to the release this machine holds on disk (see README, "Installing torch").
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup setup-dev train test benchmarks

$(PYTHON):
	python3 -m venv $(VENV)

setup: $(PYTHON)
	$(PYTHON) -m pip install -q -e .

setup-dev: $(PYTHON)
	$(PYTHON) -m pip install -q $(TORCH) -e ".[dev,reference]"

train: setup
	$(PYTHON) -m numpylenet.train $(ARGS)

test: setup-dev
	$(PYTHON) -m pytest $(ARGS)

benchmarks: setup-dev
	$(PYTHON) -m benchmarks.all $(ARGS)
