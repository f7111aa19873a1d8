"""The privacy boundary, as declared in dvc.yaml: every output's ``meta.side`` and every stage's
``meta.role``, and the check that each declared side agrees with what the output depends on.

Sides: ``public``; ``private`` (raw private data, or anything derived from it without DP);
``dp-release`` (made by the DP mechanism, or only from its releases and public data); ``evaluation``
(aggregate scores against private data). Roles: ``private-source`` (reads the private data set),
``dp-mechanism`` (DP fine-tuning: the one place private data may become a release), ``evaluation``
(scoring against private data: may emit aggregates).
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

SIDES = ("public", "private", "dp-release", "evaluation")
AGGREGATE_SUFFIXES = (".json", ".png", ".tsv", ".csv", ".md")  # what an evaluation aggregate may be (or a dvclive/ folder)
ROLES = ("private-source", "dp-mechanism", "evaluation")


def read_stages(repo: str | os.PathLike = ".") -> dict:
    return yaml.safe_load((Path(repo) / "dvc.yaml").read_text())["stages"]


def outputs(stages: dict) -> list[tuple[str, str, dict]]:
    """(stage, path, props) of every output."""
    return [(name, *((o, {}) if isinstance(o, str) else next(iter(o.items()))))
            for name, st in stages.items() for o in st.get("outs", [])]


def stage_needs(stages: dict) -> dict[str, set[str]]:
    """For each stage, the stages whose outputs it lists as deps (dvc.yaml's graph)."""
    producer = {path: name for name, path, _ in outputs(stages)}
    return {name: {producer[d] for d in st.get("deps", []) if d in producer} for name, st in stages.items()}


def _cmd_pairs(stage: dict, flags: tuple[str, ...]) -> dict[str, str]:
    words = stage["cmd"].split()
    return dict(words[i + 1].split("=", 1) for i, w in enumerate(words[:-1]) if w in flags)


def stage_paths(stages: dict, stage: str) -> dict[str, str]:
    """A stage's ``--in``/``--out``/``--state`` NAME=PATH pairs, from its cmd: the one place paths are written."""
    return _cmd_pairs(stages[stage], ("--in", "--out", "--state"))


def output_sides(stages: dict) -> dict[str, str | None]:
    return {path: (props.get("meta") or {}).get("side") for _, path, props in outputs(stages)}


def state_sides(stages: dict) -> dict[str, str | None]:
    """The resumable-state folders (``--state NAME=PATH`` in a stage's cmd; not DVC outputs) and the side
    each stage declares for them in ``meta.state: {PATH: side}``; None where undeclared."""
    return {path: ((st.get("meta") or {}).get("state") or {}).get(path)
            for st in stages.values() for path in _cmd_pairs(st, ("--state",)).values()}


def allowed_sides(role: str | None, dep_sides: set[str]) -> set[str]:
    """The sides an output may declare, given its stage's role and the sides of its inputs."""
    if role == "private-source":
        return {"private"}
    if "private" in dep_sides:
        return {"private", "dp-release"} if role == "dp-mechanism" else \
            {"private", "evaluation"} if role == "evaluation" else {"private"}
    if "evaluation" in dep_sides:
        return {"evaluation", "private"}
    if "dp-release" in dep_sides:
        return {"dp-release", "evaluation", "private"}
    return set(SIDES)


def check_boundary(stages: dict, *, metrics: list | None = None, plots: list | None = None) -> list[str]:
    """Every violation of the declared boundary, as sentences (empty when it holds)."""
    errors = []
    sides = output_sides(stages)
    for name, st in stages.items():
        role = (st.get("meta") or {}).get("role")
        if role is not None and role not in ROLES:
            errors.append(f"stage {name}: meta.role {role!r} is not one of {ROLES}")
        reads_private_params = any(str(p).startswith("data.private") for p in st.get("params", []))
        if reads_private_params and role != "private-source":
            errors.append(f"stage {name} reads params data.private but is not meta.role private-source")
        dep_sides = {sides[d] for d in st.get("deps", []) if d in sides}
        for out in st.get("outs", []):
            path, props = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            side = (props.get("meta") or {}).get("side")
            if side not in SIDES:
                errors.append(f"{path} ({name}): meta.side {side!r} must be one of {SIDES}")
                continue
            ok = allowed_sides(role, dep_sides)
            if side not in ok:
                errors.append(f"{path} ({name}) is declared {side!r} but depends on {sorted(dep_sides)} "
                              f"(stage role {role}): it must be one of {sorted(ok)}")
            if side == "evaluation" and not (path.endswith(AGGREGATE_SUFFIXES) or path.startswith("dvclive/")):
                errors.append(f"{path} ({name}) is declared 'evaluation' but is not a metrics, plot or table file: "
                              f"only aggregates ({', '.join(AGGREGATE_SUFFIXES)}, dvclive/) may be")
            if side == "private" and props.get("cache", True) and props.get("push", True):
                errors.append(f"{path} ({name}) is private and cached: it needs push: false (never to the shared remote)")
        for path, side in state_sides({name: st}).items():
            ok = allowed_sides(role, dep_sides)
            if side not in ok:
                errors.append(f"state folder {path} ({name}) declares side {side!r} in meta.state; given its inputs it "
                              f"must be one of {sorted(ok)}")
            if path in sides:
                errors.append(f"state folder {path} ({name}) is also a DVC output: resumable state must not be "
                              "(a persist output blocks run-cache restores)")
    private = [p for p, s in sides.items() if s == "private"]
    for kind, entries in (("metrics", metrics or []), ("plots", plots or [])):
        for e in entries:
            f = e if isinstance(e, str) else next(iter(e))
            if any(f == p or f.startswith(p.rstrip("/") + "/") for p in private):
                errors.append(f"top-level {kind} lists {f}, a private output")
    return errors


def stages_on_side(stages: dict, side: str) -> list[str]:
    """Stages all of whose outputs declare ``side``, in dvc.yaml's order."""
    return [name for name, st in stages.items()
            if st.get("outs") and all((props.get("meta") or {}).get("side") == side for _, _, props in outputs({name: st}))]


def private_only_stages(stages: dict) -> set[str]:
    """Stages all of whose outputs are private: their output stays out of Prefect logs."""
    return set(stages_on_side(stages, "private"))
