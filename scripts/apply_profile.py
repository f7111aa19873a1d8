"""Merge a profile of overrides (a YAML file shaped like params.yaml) into params.yaml.

    python scripts/apply_profile.py tests/tiny_params.yaml [--params params.yaml]

Used by scripts/smoke_repro.sh to run the README's first command on the tiny profile in a copy of
the repository. It rewrites params.yaml without its comments: run it in a copy, not your checkout.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if key not in base:
            raise SystemExit(f"apply_profile: {key!r} is not a key of params.yaml")
        out[key] = merge(base[key], value) if isinstance(value, dict) else value
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    profile = yaml.safe_load(Path(args.profile).read_text())
    Path(args.params).write_text(yaml.safe_dump(merge(params, profile), sort_keys=False))


if __name__ == "__main__":
    main()
