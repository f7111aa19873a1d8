"""The README's first command, timed as a newcomer runs it: a fresh clone of this repository, `make repro` from a clean
shell (`env -i`, PATH without any venv), the machine's day figure (`benchmarks/pretrain_step.py`, last row) before and
after, and each stage's time read from the process list. Appends one row to the table in --out.

    python benchmarks/repro_time.py [--rev HEAD] [--interval 2] [--keep DIR] [--out benchmarks/results/repro_time.md]
    python benchmarks/repro_time.py --plot-only --since d2bb1fd   # the runs at the current defaults drawn apart
    python benchmarks/repro_time.py --profile benchmarks/profiles/fast.yaml   # -> benchmarks/results/repro_time_fast.md
    python benchmarks/repro_time.py --plot-only        # redraw the plot from the table, run nothing

``--profile``: merged into the clone's params.yaml (scripts/apply_profile.py) before `make repro`, the rest as above;
its runs go to their own table (default ``repro_time_<profile>.md``), so that the defaults' fit stays the defaults'.

The clone (with its private data, models and `make repro` log) lives in a scratch folder that is deleted afterwards
unless --keep names one. The row holds times and the release's evaluation aggregates only (epsilon spent, the CNN's
accuracy on the real test split, label consistency, `fid_domain`): what the README reports.

Beside the table, `<out>.png` plots each run's total time against its day figure (the mean of before and after), the
line through the origin fitted to the runs that exited 0 (minutes per s/step), issue 14's 30-minute goal and the day
figure at which that line reaches it. It is redrawn after every run."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
STAGE_RE = re.compile(r"-m\s+stages\.(\w+)")
HEADER = ["| commit | started (UTC) | day figure before / after (s/step) | total | exit | stages (s) | epsilon | CNN % (std) "
          "| label consistency | fid_domain |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]


def day_figure(python: str, cwd: Path) -> float | None:
    """The last row of `benchmarks/pretrain_step.py` (s/step at batch 192), run in ``cwd`` with ``python``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pretrain_step.md"
        r = subprocess.run([python, "benchmarks/pretrain_step.py", "--out", str(out)], cwd=cwd, capture_output=True, text=True)
        if r.returncode or not out.exists():
            print(f"day figure failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return None
        return parse_day_figure(out.read_text())


def parse_day_figure(table: str) -> float | None:
    rows = [line for line in table.splitlines() if line.startswith("| pretrain_ldm")]
    return float(rows[-1].split("|")[3]) if rows else None


def stage_durations(seen: list[tuple[float, list[str]]], t0: float, t_end: float) -> list[tuple[str, float]]:
    """Each stage's time from the process-list samples ``seen`` [(time, stages running)]: from its first sighting to the
    next stage's first sighting (the last one to ``t_end``); what comes before the first stage is the bootstrap."""
    first: dict[str, float] = {}
    for t, names in seen:
        for name in names:
            first.setdefault(name, t)
    order = sorted(first, key=first.get)
    starts = [first[s] for s in order] + [t_end]
    out = [("bootstrap", (starts[0] if order else t_end) - t0)]
    out += [(s, starts[i + 1] - starts[i]) for i, s in enumerate(order)]
    return out


def running_stages() -> list[str]:
    import psutil

    names = set()
    for p in psutil.process_iter(["cmdline"]):
        m = STAGE_RE.search(" ".join(p.info["cmdline"] or []))
        if m:
            names.add(m.group(1))
    return sorted(names)


def append_row(text: str, row: str, command: str, interval: float) -> str:
    """``text`` (the results file, or "" for a new one) with ``row`` added at the end of its table and ``command``
    (the run's provenance line) at the end of the list of commands below it."""
    if not text:
        text = "\n".join(["# The README's first command, timed from a fresh clone in a clean shell", "",
                          "One row per `python benchmarks/repro_time.py` run; the commands, in the same order, below the "
                          f"table. Stage times from the process list (every {interval:g} s): each from its start to the next "
                          "stage's start. Quote them only with their day figures.", "", *HEADER, "", "Commands:", ""]) + "\n"
    lines = text.rstrip("\n").split("\n")
    last = max(i for i, line in enumerate(lines) if line.startswith("|"))
    lines.insert(last + 1, row)
    return "\n".join(lines + [f"- {command}"]) + "\n"


def format_row(rev: str, started: datetime.datetime, before: float | None, after: float | None, seconds: float,
               exit_code: int, stages: list[tuple[str, float]], eps, clf: dict, fid: dict) -> str:
    """One table row (``HEADER``'s columns); a missing figure is "-"."""
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    return (f"| {rev} | {started:%Y-%m-%d %H:%M} | {fmt(before, '.2f')} / {fmt(after, '.2f')} | "
            f"**{seconds / 60:.1f} min** ({seconds:.0f} s) | {exit_code} | "
            f"{', '.join(f'{name} {sec:.0f}' for name, sec in stages)} | {fmt(eps, '.3f')} | "
            f"{fmt(100 * clf['cnn_accuracy'] if 'cnn_accuracy' in clf else None, '.1f')} "
            f"({fmt(100 * clf['cnn_accuracy_std'] if 'cnn_accuracy_std' in clf else None, '.1f')}) | "
            f"{fmt(fid.get('label_consistency'), '.3f')} | {fmt(fid.get('fid_domain'), '.1f')} |")


ROW_RE = re.compile(r"^\| (?P<commit>\w+) \| (?P<started>[^|]+?) \| (?P<before>[\d.]+|-) / (?P<after>[\d.]+|-) \| "
                    r"\*\*[\d.]+ min\*\* \((?P<seconds>\d+) s\) \| (?P<exit>-?\d+) \|")


def parse_rows(text: str) -> list[dict]:
    """The runs of a results table written by this script: commit, started, day figures before / after (None for "-"),
    total seconds, exit status; other lines are skipped."""
    day = lambda v: None if v == "-" else float(v)
    out = []
    for line in text.splitlines():
        m = ROW_RE.match(line)
        if m:
            out.append({"commit": m["commit"], "started": m["started"], "before": day(m["before"]), "after": day(m["after"]),
                        "seconds": int(m["seconds"]), "exit": int(m["exit"])})
    return out


def day_mean(row: dict) -> float | None:
    """A run's day figure: the mean of the figures before and after it (the one there is, if only one)."""
    days = [d for d in (row["before"], row["after"]) if d is not None]
    return sum(days) / len(days) if days else None


def minutes_per_day_figure(rows: list[dict]) -> float | None:
    """Least-squares slope through the origin of total minutes against the day figure, over the runs that exited 0
    and have a day figure (None if there are none)."""
    pts = [(day_mean(r), r["seconds"] / 60) for r in rows if r["exit"] == 0 and day_mean(r) is not None]
    sxx = sum(x * x for x, _ in pts)
    return sum(x * y for x, y in pts) / sxx if sxx else None


GOAL_MINUTES = 30.0  # issue 14: the whole `make repro` within 30 minutes on a slow day


def runs_since(rows: list[dict], since: str) -> list[dict]:
    """The rows from the first run of commit ``since`` (a prefix of its short hash) on: the runs of the current defaults."""
    for i, r in enumerate(rows):
        if since and r["commit"].startswith(since):
            return rows[i:]
    raise SystemExit(f"--since {since}: no run of that commit in the table; give the commit of the first run at the "
                     f"current defaults (one of {', '.join(r['commit'] for r in rows[-5:])}, ...)")


def crowded_runs(rows: list[dict], *, dx: float = 0.04, dy: float = 1.5) -> list[dict]:
    """The runs whose point lies within ``dx`` s/step and ``dy`` minutes of another's: their labels would overlap."""
    pts = [(day_mean(r), r["seconds"] / 60) for r in rows]
    return [r for i, (r, (x, y)) in enumerate(zip(rows, pts, strict=True))
            if any(j != i and abs(x - u) < dx and abs(y - v) < dy for j, (u, v) in enumerate(pts))]


def plot(rows: list[dict], path: Path, *, profile: str = "", since: str = "") -> None:
    """Total minutes against the day figure, one labelled point per run (a cross where it failed), the fitted line and
    the goal; ``profile`` names the profile the runs applied (in the title). ``since``: the runs from that commit on
    (``runs_since``) are drawn apart with a line of their own, and the goal's reading is theirs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in rows if day_mean(r) is not None]
    current = runs_since(rows, since) if since else []
    crowded = crowded_runs(ok)
    for r in ok:
        x, y = day_mean(r), r["seconds"] / 60
        ax.plot(x, y, "o" if r["exit"] == 0 else "x", color="C3" if r["exit"] else "C2" if r in current else "C0")
        if r not in crowded:  # a label where it can be read; the table names every run
            ax.annotate(f"{r['commit']} ({r['started'][:10]})", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
    slope = minutes_per_day_figure(rows)
    own = minutes_per_day_figure(current) if current else None
    # wide enough for every run and for the day figure at which the fitted line reaches the goal
    xmax = max([day_mean(r) for r in ok] + [1.0] + ([GOAL_MINUTES / slope] if slope else [])) * 1.1
    if slope:
        ax.plot([0, xmax], [0, slope * xmax], "--", color="C0", lw=1,
                label=f"fit through the origin: {slope:.1f} min per s/step" + (", every run" if current else ""))
    if own:
        ax.plot([0, xmax], [0, own * xmax], "-.", color="C2", lw=1,
                label=f"the {len(current)} runs since {since} (green): {own:.1f} min per s/step")
    if own or slope:
        at_goal = GOAL_MINUTES / (own or slope)
        ax.axvline(at_goal, color="grey", lw=0.8, ls=":")
        ax.annotate(f"{GOAL_MINUTES:g} min at {at_goal:.2f} s/step;\ntwice as slow a day fits if measured at <= {at_goal / 2:.2f}",
                    (at_goal, 2), xytext=(-4, 0), textcoords="offset points", fontsize=7, color="grey", ha="right")
    ax.axhline(GOAL_MINUTES, color="C3", lw=1, label=f"issue 14's goal: {GOAL_MINUTES:g} min")
    ax.set(xlim=(0, xmax), ylim=(0, max([r["seconds"] / 60 for r in ok] + [GOAL_MINUTES]) * 1.15),
           xlabel="day figure (benchmarks/pretrain_step.py, s/step; mean of before and after)",
           ylabel="make repro from a fresh clone (min)",
           title="The README's first command against the machine's speed" + (f" ({profile})" if profile else ""))
    if crowded:
        ax.annotate(f"{len(crowded)} runs too close to label: benchmarks/results/repro_time.md names them",
                    (0.01, 0.99), xycoords="axes fraction", xytext=(4, -4), textcoords="offset points", fontsize=7,
                    color="grey", va="top", ha="left")
    ax.legend(loc="upper left", fontsize=8, bbox_to_anchor=(0, 0.95))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_path(out: str | None, profile: Path | None) -> Path:
    """--out, or the default table: ``repro_time.md`` for the defaults, ``repro_time_<profile>.md`` for a profile."""
    return Path(out or (f"benchmarks/results/repro_time_{profile.stem}.md" if profile else "benchmarks/results/repro_time.md"))


def apply_profile(clone: Path, profile: Path) -> None:
    """Merge ``profile`` (the file as it is in this checkout) into the clone's params.yaml with the clone's own
    scripts/apply_profile.py (a key outside params.yaml stops it)."""
    subprocess.run([sys.executable, "scripts/apply_profile.py", str(profile.resolve())], cwd=clone, check=True)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="the commit to clone and run (default: HEAD; uncommitted changes are not run)")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between process-list samples")
    ap.add_argument("--keep", help="clone into this (new) folder and keep it, the log beside it as <folder>.make_repro.log "
                    "(default: a scratch folder, deleted)")
    ap.add_argument("--out", help="default benchmarks/results/repro_time.md; with --profile, repro_time_<profile>.md")
    ap.add_argument("--profile", help="a profile (YAML shaped like params.yaml, e.g. benchmarks/profiles/fast.yaml) applied "
                    "to the clone's params.yaml before `make repro`")
    ap.add_argument("--plot-only", action="store_true", help="redraw <out>.png from the table in --out; run nothing")
    ap.add_argument("--since", default="", help="the commit of the first run at the current defaults: the plot draws "
                    "the runs from it on apart, with their own line, and reads the goal from that line")
    args = ap.parse_args()
    profile = Path(args.profile) if args.profile else None
    if profile is not None and not profile.is_file():
        raise SystemExit(f"--profile {args.profile}: no such file; the profiles are in benchmarks/profiles/")
    out = results_path(args.out, profile)
    label = profile.name if profile else ""  # the plot's title names the profile its runs applied
    if args.plot_only:
        rows = parse_rows(out.read_text()) if out.exists() else []
        if not rows:
            raise SystemExit(f"--plot-only: no run rows in {out}; run the benchmark first")
        plot(rows, out.with_suffix(".png"), profile=label, since=args.since)
        print(f"wrote {out.with_suffix('.png')} from {len(rows)} runs")
        return
    started = datetime.datetime.now(datetime.timezone.utc)
    if args.keep and Path(args.keep).exists():
        raise SystemExit(f"--keep {args.keep}: exists; name a new folder")
    rev = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not rev:
        raise SystemExit(f"--rev {args.rev}: not a commit of this repository")
    before = day_figure(sys.executable, ROOT)
    print(f"day figure before: {before} s/step", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="repro_time_"))
    clone = Path(args.keep) if args.keep else scratch / "repo"
    log = Path(f"{args.keep.rstrip('/')}.make_repro.log") if args.keep else scratch / "make_repro.log"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", rev], cwd=clone, check=True)
        if profile is not None:
            apply_profile(clone, profile)
        env = {"HOME": os.environ.get("HOME", str(Path.home())), "PATH": CLEAN_PATH}
        seen: list[tuple[float, list[str]]] = []
        t0 = time.time()
        with open(log, "w") as fh:
            proc = subprocess.Popen(["make", "repro"], cwd=clone, env=env, stdout=fh, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                seen.append((time.time(), running_stages()))
                time.sleep(args.interval)
        t_end = time.time()
        print(f"make repro: exit {proc.returncode} in {t_end - t0:.0f} s (log {log})", flush=True)
        after = day_figure(str(clone / ".venv/bin/python"), clone) if (clone / ".venv/bin/python").exists() else None
        print(f"day figure after: {after} s/step", flush=True)
        stages = stage_durations(seen, t0, t_end)
        clf = read_json(clone / "dvclive/score_classifier/metrics.json")
        fid = read_json(clone / "dvclive/score_fid/metrics.json")
        eps = read_json(clone / "dvclive/dp_finetune/metrics.json").get("train", {}).get("epsilon_spent")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    row = format_row(rev, started, before, after, t_end - t0, proc.returncode, stages, eps, clf, fid)
    text = append_row(out.read_text() if out.exists() else "", row, provenance("repro_time.py", None, started, commit=rev), args.interval)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    plot(parse_rows(text), out.with_suffix(".png"), profile=label, since=args.since)
    print("\n".join(HEADER + [row]))
    if proc.returncode:
        raise SystemExit(f"make repro failed (exit {proc.returncode})")


if __name__ == "__main__":
    main()
