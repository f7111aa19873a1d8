# The README's entry points. Every target bootstraps the venv first (idempotent) and puts its bin/ first
# on PATH, so `dvc repro` runs each stage's `python -m stages...` with the project's interpreter even
# from a clean shell with no venv activated.
VENV ?= .venv
export VENV := $(abspath $(VENV))
export PATH := $(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(VENV)
export DVC_NO_ANALYTICS=1
export DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: env repro test test-fast lint smoke flow sweep bench
env:
	./scripts/bootstrap.sh

repro: env
	dvc repro

# Two processes, one test file each at a time (files share module fixtures; the loopback test mostly
# waits on its server and workers, so it overlaps well with the rest).
test: env
	python -m pytest -q -n 2 --dist loadfile --durations=15

# The tests not marked slow (no whole-pipeline runs, no servers): under 2 minutes.
test-fast: env
	python -m pytest -q -m "not slow"

lint: env
	ruff check .

# The whole README first command on the tiny profile, in a fresh copy, from a PATH without the venv (CI runs it).
smoke: env
	./scripts/smoke_repro.sh

flow: env
	python -m pipeline.flow

sweep: env
	python -m pipeline.sweep --epsilons 1 5 10

# Per-step cost of the AE and LDM training steps: quote it beside every timing (the machine drifts ~2x by day).
bench: env
	python benchmarks/pretrain_step.py
