#!/usr/bin/env bash
# Creates .venv if missing and installs the pinned dependencies; does nothing when they are already in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
  .venv/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# Offline hygiene: no analytics, no update checks, no telemetry.
.venv/bin/dvc config --local core.analytics false >/dev/null 2>&1 || true
