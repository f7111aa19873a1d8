"""Where the autoencoder's training step goes on this CPU: seconds per example of `pretrain_ae`'s step (params.yaml's
AE, random inputs) at several batch sizes, and with PyTorch's own convolutions instead of oneDNN's, alternated over
rounds in one process so that the machine's drift hits every variant alike. Then a `torch.profiler` table of the
step as the stage runs it.

    python benchmarks/ae_step.py [--batches 32 64 128 256] [--rounds 2] [--steps 4] [--set ae.batch_size=128]
        [--out benchmarks/results/ae_step.md]"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import yaml

from dpldm.config import load_all, with_overrides

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_step import ae_step_fn, alternated, profile_rows, ratio_rows  # noqa: E402
from provenance import provenance, write_table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--profile-steps", type=int, default=4, help="steps under torch.profiler (0: no profile)")
    ap.add_argument("--set", default="", help="params overrides, key=value,key=value (as pipeline.sweep --set)")
    ap.add_argument("--out", default="benchmarks/results/ae_step.md")
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    from pipeline.sweep import parse_assignments

    overrides = parse_assignments(args.set) if args.set else {}
    c = load_all(with_overrides(yaml.safe_load(Path("params.yaml").read_text()), overrides))
    torch.set_num_threads(c["runtime"].threads or torch.get_num_threads())
    pub, ae_cfg = c["data"].public, c["ae"]
    shape = dict(channels=pub.channels, image_size=pub.image_size)

    def variant(batch: int, onednn: bool):
        def make():
            with torch.backends.mkldnn.flags(enabled=onednn):
                step = ae_step_fn(ae_cfg, batch, **shape)

            def run():
                with torch.backends.mkldnn.flags(enabled=onednn):
                    step()
            return run
        return make

    variants = [(f"batch {b}", b, variant(b, True)) for b in args.batches]
    variants.append((f"batch {ae_cfg.batch_size}, PyTorch's own convolutions (oneDNN off)", ae_cfg.batch_size,
                     variant(ae_cfg.batch_size, False)))
    times = alternated(variants, args.rounds, args.steps, "step")
    lines = [provenance("ae_step.py", argv, started), "",
             f"{torch.get_num_threads()} threads, {args.steps} timed steps per variant and round, {args.rounds} rounds "
             f"alternated; params.yaml's AE"
             f"{f' with {overrides}' if overrides else ''} ({list(ae_cfg.block_out_channels)}, {shape['image_size']}x{shape['image_size']}"
             f"x{shape['channels']}), random inputs.", "",
             "| variant | s / step (per round) | ms / example (median) | vs params.yaml's batch |", "|---|---|---:|---:|"]
    # the stage's own batch, if --batches has it, is the ratios' reference
    lines += ratio_rows(variants, times, f"batch {ae_cfg.batch_size}")

    if args.profile_steps:
        lines += ["", f"`torch.profiler`, {args.profile_steps} steps at batch {ae_cfg.batch_size} (oneDNN on, as the stage "
                  "runs): the operators with the most self CPU time.", ""]
        lines += profile_rows(ae_step_fn(ae_cfg, ae_cfg.batch_size, **shape), args.profile_steps)
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
