# The two entry points of the README. Both bootstrap .venv first (idempotent).
export DVC_NO_ANALYTICS=1
export DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: env repro test flow sweep bench
env:
	./scripts/bootstrap.sh

repro: env
	.venv/bin/dvc repro

test: env
	.venv/bin/python -m pytest -q

flow: env
	.venv/bin/python -m pipeline.flow

sweep: env
	.venv/bin/python -m pipeline.sweep --epsilons 1 5 10
