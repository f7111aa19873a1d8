#!/usr/bin/env bash
# Creates the venv ($VENV, default .venv) if missing and installs the pinned dependencies; does nothing
# when they are already in (a stamp records the hash of the pin files).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $("$PY" --version 2>&1) and installing the pinned packages (a few minutes, once)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps -e .
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
# Offline hygiene: no analytics, no update checks, no telemetry.
"$VENV/bin/dvc" config --local core.analytics false >/dev/null 2>&1 || true
