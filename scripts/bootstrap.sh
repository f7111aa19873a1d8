#!/usr/bin/env bash
# Creates the venv ($VENV, default .venv) if missing and installs the pinned dependencies; does nothing
# when they are already in (a stamp records the hash of the pin files).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $("$PY" --version 2>&1) and installing the pinned packages (once)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
# uv (pinned, into the venv) installs the same pins about 10x faster than pip (15-20 s against 210-240 s here,
# README); it is told pip's own index, find-links, constraint and CA settings. pip remains the fallback.
UV_VERSION=0.13.9
pip_setting() {  # the last value pip's configuration (any scope, PIP_* variables included) gives KEY
  "$VENV/bin/python" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | tail -1
}
uv_install() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "uv==$UV_VERSION" || return 1
  local args=(--python "$VENV/bin/python" --index-strategy unsafe-best-match) v
  v="$(pip_setting index-url)"; [ -n "$v" ] && args+=(--index-url "$v")
  for v in $(pip_setting extra-index-url); do args+=(--extra-index-url "$v"); done
  for v in $(pip_setting find-links); do args+=(--find-links "$v"); done
  for v in $(pip_setting constraint); do [ -f "$v" ] && args+=(-c "$v"); done
  v="$(pip_setting cert)"; [ -f "$v" ] && export SSL_CERT_FILE="$v"  # pip's CA bundle, for the registry
  "$VENV/bin/uv" pip install -q "${args[@]}" -r requirements.txt -c constraints.txt &&
    "$VENV/bin/uv" pip install -q "${args[@]}" --no-deps -e .
}
if [ ! -f "$stamp" ]; then
  if ! uv_install; then
    echo "bootstrap: uv could not install the pins; falling back to pip (slower)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps -e .
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
# Offline hygiene: no analytics, no update checks, no telemetry.
"$VENV/bin/dvc" config --local core.analytics false >/dev/null 2>&1 || true
