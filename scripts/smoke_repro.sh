#!/usr/bin/env bash
# The README's first command (`make repro`) as a new user runs it, on the tiny profile: in a fresh copy of
# the repository (tracked and untracked-not-ignored files, as a clone of this working tree would hold),
# from a shell whose PATH holds no project venv and no VIRTUAL_ENV. Fails if any stage fails or any stage
# is left stale. The copy reuses this checkout's venv through VENV (the bootstrap's stamp says it is current).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
venv="$(cd "${VENV:-.venv}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
copy="$work/repo"
mkdir -p "$copy"
git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$copy"
cd "$copy"
"$venv/bin/python" scripts/apply_profile.py tests/tiny_params.yaml
git init -q && git add -A && git -c user.name=smoke -c user.email=smoke@localhost commit -qm "tiny profile"
# A clean shell: no venv anywhere on PATH, nothing activated, no PYTHONPATH.
clean_path="$(printf '%s' "$PATH" | tr ':' '\n' | grep -v -e '/\.venv/' -e "^$venv" ${VIRTUAL_ENV:+-e "^$VIRTUAL_ENV"} | paste -sd: -)"
if env PATH="$clean_path" python3 -c 'import PIL, torch' 2>/dev/null; then
  echo "smoke: note: the system python3 on PATH has PIL and torch; the run below does not prove the PATH fix"
fi
start=$(date +%s)
env -u VIRTUAL_ENV -u PYTHONPATH PATH="$clean_path" VENV="$venv" DPLDM_PROGRESS=0 make repro
stale="$(env -u VIRTUAL_ENV PATH="$venv/bin:$clean_path" dvc status --json)"
if [ "$stale" != "{}" ]; then
  echo "smoke: FAILED: stages left stale after make repro: $stale" >&2
  exit 1
fi
test -s dvclive/score_classifier/metrics.json
test -s reports/dp_finetune/ledger.json
echo "smoke: make repro on the tiny profile ran every stage from a clean PATH in $(( $(date +%s) - start )) s"
