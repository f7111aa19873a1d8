"""Sampler settings (DDIM eta, steps, classifier-free guidance) for a trained LDM, scored on a PUBLIC PROXY
of the private set, so that the default they pick is not a choice made on private data (invariant 7).

    python scripts/apply_profile.py benchmarks/profiles/public_proxy.yaml && make repro   # in a copy of the repo
    python benchmarks/sampling_sweep.py [--ldm models/ldm_private] [--per-class 100] [--tstr]
        [--settings eta=1,steps=25,w=0 eta=0,steps=25,w=0 ...] [--out benchmarks/results/sampling_sweep.md]
    (a setting's keys: eta, steps, w, precision, solver, spacing; each defaults as in ``parse_setting``)

Run it in a workspace where `dvc repro` has finished on the public proxy profile (the "private" set is
then scikit-learn's public 8x8 digits). It refuses a workspace whose private source is not a public
proxy (``data.private.source`` in PUBLIC_PROXIES) unless ``--allow-private`` is given, and then says
that its choice is outside the ledger. For each setting it draws ``per_class`` samples per class with
the same seed and reports:
- label consistency: share of samples that the domain CNN of the `reference` stage (trained on the
  proxy's train split) assigns to the class they were conditioned on;
- fid_domain / kid_domain against the proxy's train split (what `score_fid` reports);
- with ``--tstr``: accuracy on the proxy's train split of a SmallCNN trained on the samples (epoch chosen on
  a synthetic validation split; epochs, batch, lr and split from params.yaml's `classifier`);
- sampling seconds per 1,000 images on this machine.
The test split is never opened here.

``--public`` scores the PUBLIC model instead, against the public set alone (no private or proxy file is read):
samples of ``models/ldm_public``; a domain CNN trained here on the public train split (``fid.domain_epochs``)
gives the label consistency and the features; FID and k-NN precision/recall are taken against the held-out
public *test* split (recall on the first 100 samples per class, the test split's size), and ``--tstr`` tests on
that split too. It measures what a sampler does to fidelity and variety on a distribution the model has
learnt well, which the 8x8 proxy (blurry, poorly conditioned) cannot. ``--seeds N`` repeats each setting with
sampling seeds seed..seed+N-1 (each its own samples and TSTR CNN) and reports mean ± std."""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpldm.config import load_section  # noqa: E402
from dpldm.diffusion import PRECISIONS, SOLVERS, SPACINGS, Sampler, make_scheduler  # noqa: E402
from dpldm.metrics import SmallCNN, fidelity, label_consistency, predict, register_domain_extractor  # noqa: E402
from stages.classify import fit_cnn, fit_domain_extractor, split_validation  # noqa: E402
from stages.common import load_model_files, read_images, read_params  # noqa: E402
from dpldm.sampling import generate, null_class_trained  # noqa: E402
from stages.artifacts import load_autoencoder, load_ldm  # noqa: E402
from coverage import stratified  # noqa: E402
from provenance import provenance, write_table  # noqa: E402

DEFAULT_SETTINGS = ["eta=1,steps=25,w=0", "eta=0,steps=25,w=0", "eta=0.5,steps=25,w=0",
                    "eta=1,steps=25,w=1", "eta=0,steps=25,w=1", "eta=0,steps=25,w=2"]


PUBLIC_PROXIES = ("digits8x8", "fontdigits")  # public sources that stand in for the private set


def parse_setting(text: str) -> dict:
    out = {"eta": 1.0, "steps": 25, "w": 0.0, "precision": "fp32", "solver": "ddim", "spacing": "leading"}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in out:
            raise SystemExit(f"unknown key {key!r} in setting {text!r}; use eta=..,steps=..,w=..,"
                             f"precision={'|'.join(PRECISIONS)},solver={'|'.join(SOLVERS)},spacing={'|'.join(SPACINGS)}")
        out[key] = type(out[key])(value)
    return out


def usable_settings(settings: list[str], ldm_cfg) -> list[str]:
    """``settings`` that the model can sample: guidance (w > 0) needs the null class, which only pretraining with
    ``ldm.label_dropout`` > 0 trains. Asked for explicitly, such a setting stops the sweep before any work; from the
    default list it is left out, with a note."""
    if null_class_trained(ldm_cfg):
        return list(settings)
    guided = [t for t in settings if parse_setting(t)["w"] > 0]
    if guided and settings is not DEFAULT_SETTINGS:
        raise SystemExit(f"sampling_sweep: setting(s) {', '.join(guided)} use guidance (w > 0), but this LDM was pretrained with "
                         "ldm.label_dropout = 0, so its null class is untrained. Drop them, or pretrain with "
                         "ldm.label_dropout > 0 (e.g. 0.1).")
    if guided:
        print(f"sampling_sweep: leaving out the guided default settings ({', '.join(guided)}): this LDM was pretrained "
              "with ldm.label_dropout = 0", flush=True)
    return [t for t in settings if t not in guided]


def sample_setting(model, ae, labels: torch.Tensor, s: dict, *, ldm_cfg, conf: dict, ae_conf: dict, scheduler, args,
                   seed: int | None = None):
    """(uint8 images, seconds) for one setting, from ``seed`` (default ``args.seed``: every setting the same)."""
    t0 = time.time()
    seed = args.seed if seed is None else seed
    sampler = Sampler(steps=s["steps"], eta=s["eta"], guidance_scale=s["w"], precision=s["precision"], solver=s["solver"],
                      spacing=s["spacing"])
    images = generate(model, ae, labels, sampler=sampler, batch_size=args.batch_size, ldm_cfg=ldm_cfg,
                      latent_shape=conf["latent_shape"], latent_scale=ae_conf["latent_scale_factor"], scheduler=scheduler,
                      generator=torch.Generator().manual_seed(seed))
    return images, time.time() - t0


def tstr(images, labels: np.ndarray, test_x, test_y, *, clf, num_classes: int, seed: int) -> float:
    """Accuracy on (test_x, test_y) of the score_classifier CNN trained on the samples (epoch chosen on a
    synthetic validation split), without its augmentation: this script's figures were all measured so, before
    ``classifier.cnn_augment_*`` existed."""
    xt, yt, xv, yv = split_validation(images, labels, fraction=clf.val_fraction, seed=seed)
    fit = fit_cnn(clf, xt, yt, xv, yv, num_classes=num_classes, seed=seed, augment=False)
    return float((predict(fit.model, test_x) == test_y).mean())


STARTED = datetime.datetime.now(datetime.timezone.utc)  # this process's start, for the provenance line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ldm", default="models/ldm_private")
    ap.add_argument("--ae", default="models/ae")
    ap.add_argument("--extractor", default="models/reference_extractor")
    ap.add_argument("--private", default="data/private/images.parquet")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="--public: sampling seeds seed..seed+N-1 per setting (mean ± std)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tstr", action="store_true", help="also train a CNN on the samples, test on the private train split")
    ap.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS)
    ap.add_argument("--out", default="benchmarks/results/sampling_sweep.md")
    ap.add_argument("--params", default="params.yaml", help="its classifier section sets the --tstr CNN")
    ap.add_argument("--allow-private", action="store_true", help="score on a real private set (a choice outside the ledger)")
    ap.add_argument("--public", action="store_true", help="score the public model on the held-out public split (see above)")
    ap.add_argument("--public-data", default="data/public/images.parquet")
    args = ap.parse_args()
    if args.public:
        return public_sweep(args)
    torch.set_num_threads(args.threads)
    params = read_params(args.params)
    clf = load_section(params, "classifier")  # the CNN score_classifier trains
    source = load_section(params, "data").private.source
    if source not in PUBLIC_PROXIES and not args.allow_private:
        raise SystemExit(f"sampling_sweep: data.private.source = {source!r} is private data; tuning on it is a choice outside the "
                         f"privacy ledger (invariant 7). Run it in a copy of the repo on the public proxy profile "
                         f"(python scripts/apply_profile.py benchmarks/profiles/public_proxy.yaml && make repro), "
                         f"or pass --allow-private to do it anyway.")

    model, ldm_cfg, conf = load_ldm(args.ldm)
    model.eval()
    args.settings = usable_settings(args.settings, ldm_cfg)
    ae, ae_conf = load_autoencoder(args.ae)
    scheduler = make_scheduler(ldm_cfg)
    state, ext_conf = load_model_files(args.extractor)
    cnn = SmallCNN.from_state_dict(state, ext_conf)
    extractor = register_domain_extractor(state, ext_conf)
    real, real_y, _ = read_images(args.private, split="train")
    labels = torch.arange(ldm_cfg.num_classes).repeat_interleave(args.per_class)

    rows = []
    for text in args.settings:
        images, seconds = sample_setting(model, ae, labels, parse_setting(text), ldm_cfg=ldm_cfg, conf=conf,
                                         ae_conf=ae_conf, scheduler=scheduler, args=args)
        consistency = label_consistency(cnn, images, labels.numpy())["label_consistency"]
        fid = fidelity(images, real, extractor=extractor, tag="domain", kid_subset_size=min(1000, len(images)))
        acc = (tstr(images, labels.numpy(), real, real_y, clf=clf, num_classes=ldm_cfg.num_classes, seed=args.seed)
               if args.tstr else float("nan"))
        rows.append((text, consistency, fid["fid_domain"], fid["kid_domain_mean"], acc, 1000 * seconds / len(images)))
        print(f"{text}: consistency {consistency:.3f}, fid_domain {fid['fid_domain']:.1f}, "
              f"kid {fid['kid_domain_mean']:.4f}, CNN on private train {acc:.3f}, {rows[-1][5]:.1f} s/1k", flush=True)

    lines = [provenance("sampling_sweep.py", None, STARTED), "",
             f"Model `{args.ldm}`, {args.per_class} samples per class, seed {args.seed}; machine {platform.machine()}, "
             f"{args.threads} threads; data.private.source = {source}"
             + ("" if source in PUBLIC_PROXIES else " (REAL PRIVATE DATA: a choice made on this is outside the ledger)")
             + ". Scores use the train split only (never the test split).", "",
             "| setting | label consistency (reference CNN) | fid_domain | kid_domain "
             "| CNN trained on samples, acc. on the train split | s per 1k samples |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {t} | {c:.3f} | {f:.1f} | {k:.4f} | {a:.3f} | {s:.1f} |" for t, c, f, k, a, s in rows]
    write_table(args.out, lines)


class PublicJudge:
    """The public criterion of ``--public``: a domain CNN trained here on the public train split gives the label
    consistency and the features; FID and k-NN precision / recall against the held-out public test split (the
    same number of samples per class as the test split has), and the TSTR CNN is tested on that split."""

    def __init__(self, public_data: str, *, clf, fcfg, num_classes: int, seed: int = 0):
        x, y, meta = read_images(public_data, split="train")
        self.test_x, self.test_y, _ = read_images(public_data, split="test")
        self.clf, self.k = clf, num_classes
        xt, yt, xv, yv = split_validation(x, y, fraction=clf.val_fraction, seed=seed)
        self.fit = fit_domain_extractor(clf, fcfg, xt, yt, xv, yv, num_classes=num_classes, seed=seed)
        self.extractor = register_domain_extractor(self.fit.model.state_dict(), {
            "channels": meta["channels"], "image_size": meta["height"], "num_classes": num_classes})
        self.per_test = int(np.bincount(self.test_y, minlength=num_classes).min())
        self.real_cut = stratified(self.test_x, self.test_y, self.per_test * num_classes)[0]
        self.test_accuracy = float((predict(self.fit.model, self.test_x) == self.test_y).mean())

    def score(self, images, labels: np.ndarray, *, with_tstr: bool, seed: int) -> dict:
        consistency = label_consistency(self.fit.model, images, labels)["label_consistency"]
        cut = stratified(images, labels, self.per_test * self.k)[0]
        m = fidelity(cut, self.real_cut, extractor=self.extractor, tag="domain", kid_subset_size=min(1000, len(cut)),
                     precision_recall=True)
        acc = (tstr(images, labels, self.test_x, self.test_y, clf=self.clf, num_classes=self.k, seed=seed)
               if with_tstr else float("nan"))
        return {"label_consistency": consistency, "fid_domain": m["fid_domain"], "precision": m["precision_domain"],
                "recall": m["recall_domain"], "tstr": acc}


PUBLIC_COLUMNS = ("label_consistency", "fid_domain", "precision", "recall", "tstr", "s_per_1k")


def mean_std(values: list[float], digits: int) -> str:
    """``m`` for one value, ``m ± s`` (sample std) for several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def public_rows(model, ae, judge: PublicJudge, settings: list[str], *, ldm_cfg, conf, ae_conf, scheduler, args) -> list[dict]:
    """One dict per (setting, sampling seed): each seed draws its own samples and trains its own TSTR CNN."""
    labels = torch.arange(ldm_cfg.num_classes).repeat_interleave(args.per_class)
    rows = []
    for text in settings:
        for seed in range(args.seed, args.seed + args.seeds):
            images, seconds = sample_setting(model, ae, labels, parse_setting(text), ldm_cfg=ldm_cfg, conf=conf,
                                             ae_conf=ae_conf, scheduler=scheduler, args=args, seed=seed)
            r = {"setting": text, "seed": seed, **judge.score(images, labels.numpy(), with_tstr=args.tstr, seed=seed),
                 "s_per_1k": 1000 * seconds / len(images)}
            rows.append(r)
            print("{setting} seed {seed}: consistency {label_consistency:.3f}, fid_domain {fid_domain:.1f}, precision "
                  "{precision:.3f}, recall {recall:.3f}, TSTR on public test {tstr:.3f}, {s_per_1k:.1f} s/1k".format(**r),
                  flush=True)
    return rows


PUBLIC_LABELS = ("label consistency", "fid_domain", "precision", "recall", "CNN trained on samples, acc. on public test",
                 "s per 1k samples")


def public_header(left: tuple[str, ...], right: tuple[str, ...] = ()) -> list[str]:
    """The markdown header of a public table: columns ``left`` (left-aligned), ``right``, then PUBLIC_LABELS (right-aligned)."""
    right = (*right, *PUBLIC_LABELS)
    return ["| " + " | ".join((*left, *right)) + " |", "|" + "---|" * len(left) + "---:|" * len(right)]


def public_cells(rows: list[dict]) -> list[str]:
    """The PUBLIC_COLUMNS cells of ``rows`` (one setting): the mean, ± the std when there are several seeds."""
    return [mean_std([r[c] for r in rows], 1 if c in ("fid_domain", "s_per_1k") else 3) for c in PUBLIC_COLUMNS]


def public_table(rows: list[dict]) -> list[str]:
    """Markdown rows: per setting, the mean (± std over sampling seeds) of each column."""
    out = []
    for text in dict.fromkeys(r["setting"] for r in rows):
        out.append(f"| {text} | " + " | ".join(public_cells([r for r in rows if r["setting"] == text])) + " |")
    return out


def public_sweep(args) -> None:
    """The sweep of ``--public``: everything from the public set."""
    torch.set_num_threads(args.threads)
    params = read_params(args.params)
    clf, fcfg = load_section(params, "classifier"), load_section(params, "fid")
    ldm_path = "models/ldm_public" if args.ldm == "models/ldm_private" else args.ldm
    model, ldm_cfg, conf = load_ldm(ldm_path)
    model.eval()
    args.settings = usable_settings(args.settings, ldm_cfg)
    ae, ae_conf = load_autoencoder(args.ae)
    scheduler = make_scheduler(ldm_cfg)
    judge = PublicJudge(args.public_data, clf=clf, fcfg=fcfg, num_classes=ldm_cfg.num_classes, seed=args.seed)
    print(f"public domain CNN: val accuracy {judge.fit.val_accuracy:.3f}; test split {len(judge.test_x)} images, "
          f"recall on {judge.per_test} per class", flush=True)
    rows = public_rows(model, ae, judge, args.settings, ldm_cfg=ldm_cfg, conf=conf, ae_conf=ae_conf,
                       scheduler=scheduler, args=args)
    seeds = f"seed {args.seed}" if args.seeds == 1 else f"sampling seeds {args.seed}..{args.seed + args.seeds - 1} (mean ± std)"
    lines = [provenance("sampling_sweep.py", None, STARTED), "",
             f"Public model `{ldm_path}`, {args.per_class} samples per class, {seeds}; machine {platform.machine()}, "
             f"{args.threads} threads. Everything from the public set `{args.public_data}`: the domain CNN trained on its "
             f"train split (test accuracy {judge.test_accuracy:.3f}); FID, precision and recall of {judge.per_test} samples "
             f"per class against its {judge.per_test * judge.k}-image held-out test split; the TSTR CNN tested on that "
             "split. No private or proxy data read.", "", *public_header(("setting",)), *public_table(rows)]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
