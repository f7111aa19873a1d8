"""Sampler settings (DDIM eta, steps, classifier-free guidance) for a trained LDM, scored on a PUBLIC PROXY
of the private set, so that the default they pick is not a choice made on private data (invariant 7).

    python scripts/apply_profile.py benchmarks/profiles/public_proxy.yaml && make repro   # in a copy of the repo
    python benchmarks/sampling_sweep.py [--ldm models/ldm_private] [--per-class 100] [--tstr]
        [--settings eta=1,steps=25,w=0 eta=0,steps=25,w=0 ...] [--out benchmarks/results/sampling_sweep.md]

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
learnt well, which the 8x8 proxy (blurry, poorly conditioned) cannot."""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpldm.config import load_section  # noqa: E402
from dpldm.diffusion import make_scheduler  # noqa: E402
from dpldm.metrics import SmallCNN, fidelity, label_consistency, predict, register_domain_extractor, train_cnn  # noqa: E402
from stages.classify import split_validation  # noqa: E402
from stages.common import load_model_files, read_images, read_params  # noqa: E402
from dpldm.sampling import generate  # noqa: E402
from stages.artifacts import load_autoencoder, load_ldm  # noqa: E402
from coverage import stratified  # noqa: E402

DEFAULT_SETTINGS = ["eta=1,steps=25,w=0", "eta=0,steps=25,w=0", "eta=0.5,steps=25,w=0",
                    "eta=1,steps=25,w=1", "eta=0,steps=25,w=1", "eta=0,steps=25,w=2"]


PUBLIC_PROXIES = ("digits8x8", "fontdigits")  # public sources that stand in for the private set


def parse_setting(text: str) -> dict:
    out = {"eta": 1.0, "steps": 25, "w": 0.0}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in out:
            raise SystemExit(f"unknown key {key!r} in setting {text!r}; use eta=..,steps=..,w=..")
        out[key] = type(out[key])(value)
    return out


def sample_setting(model, ae, labels: torch.Tensor, s: dict, *, ldm_cfg, conf: dict, ae_conf: dict, scheduler, args):
    """(uint8 images, seconds) for one setting, always from the same seed."""
    t0 = time.time()
    images = generate(model, ae, labels, ldm_cfg=ldm_cfg, latent_shape=conf["latent_shape"],
                      latent_scale=ae_conf["latent_scale_factor"], scheduler=scheduler, steps=s["steps"], eta=s["eta"],
                      guidance_scale=s["w"], batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed))
    return images, time.time() - t0


def tstr(images, labels: np.ndarray, test_x, test_y, *, clf, num_classes: int, seed: int) -> float:
    """Accuracy on (test_x, test_y) of the score_classifier CNN trained on the samples (epoch chosen on a
    synthetic validation split)."""
    xt, yt, xv, yv = split_validation(images, labels, fraction=clf.val_fraction, seed=seed)
    fit = train_cnn(xt, yt, xv, yv, num_classes=num_classes, epochs=clf.cnn_epochs, batch_size=clf.cnn_batch_size,
                    lr=clf.cnn_lr, seed=seed)
    return float((predict(fit.model, test_x) == test_y).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ldm", default="models/ldm_private")
    ap.add_argument("--ae", default="models/ae")
    ap.add_argument("--extractor", default="models/reference_extractor")
    ap.add_argument("--private", default="data/private/images.parquet")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
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

    lines = [f"Model `{args.ldm}`, {args.per_class} samples per class, seed {args.seed}; machine {platform.machine()}, "
             f"{args.threads} threads; data.private.source = {source}"
             + ("" if source in PUBLIC_PROXIES else " (REAL PRIVATE DATA: a choice made on this is outside the ledger)")
             + ". Scores use the train split only (never the test split).", "",
             "| setting | label consistency (reference CNN) | fid_domain | kid_domain "
             "| CNN trained on samples, acc. on the train split | s per 1k samples |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {t} | {c:.3f} | {f:.1f} | {k:.4f} | {a:.3f} | {s:.1f} |" for t, c, f, k, a, s in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def public_sweep(args) -> None:
    """The sweep of ``--public``: everything from the public set."""
    torch.set_num_threads(args.threads)
    params = read_params(args.params)
    clf, fcfg = load_section(params, "classifier"), load_section(params, "fid")
    ldm_path = "models/ldm_public" if args.ldm == "models/ldm_private" else args.ldm
    model, ldm_cfg, conf = load_ldm(ldm_path)
    model.eval()
    ae, ae_conf = load_autoencoder(args.ae)
    scheduler = make_scheduler(ldm_cfg)
    x, y, meta = read_images(args.public_data, split="train")
    test_x, test_y, _ = read_images(args.public_data, split="test")
    k = ldm_cfg.num_classes
    xt, yt, xv, yv = split_validation(x, y, fraction=clf.val_fraction, seed=args.seed)
    fit = train_cnn(xt, yt, xv, yv, num_classes=k, epochs=fcfg.domain_epochs, batch_size=clf.cnn_batch_size,
                    lr=clf.cnn_lr, seed=args.seed)
    extractor = register_domain_extractor(fit.model.state_dict(), {"channels": meta["channels"], "image_size": meta["height"],
                                                                     "num_classes": k})
    per_test = int(np.bincount(test_y, minlength=k).min())
    real_cut = stratified(test_x, test_y, per_test * k)[0]
    print(f"public domain CNN: val accuracy {fit.val_accuracy:.3f}; test split {len(test_x)} images, "
          f"recall on {per_test} per class", flush=True)
    labels = torch.arange(k).repeat_interleave(args.per_class)
    rows = []
    for text in args.settings:
        images, seconds = sample_setting(model, ae, labels, parse_setting(text), ldm_cfg=ldm_cfg, conf=conf,
                                         ae_conf=ae_conf, scheduler=scheduler, args=args)
        consistency = label_consistency(fit.model, images, labels.numpy())["label_consistency"]
        cut = stratified(images, labels.numpy(), per_test * k)[0]
        m = fidelity(cut, real_cut, extractor=extractor, tag="domain", kid_subset_size=min(1000, len(cut)),
                     precision_recall=True)
        acc = tstr(images, labels.numpy(), test_x, test_y, clf=clf, num_classes=k, seed=args.seed) if args.tstr else float("nan")
        rows.append((text, consistency, m["fid_domain"], m["precision_domain"], m["recall_domain"], acc,
                     1000 * seconds / len(images)))
        print("{}: consistency {:.3f}, fid_domain {:.1f}, precision {:.3f}, recall {:.3f}, TSTR on public test {:.3f}, "
              "{:.1f} s/1k".format(*rows[-1]), flush=True)
    test_fit = float((predict(fit.model, test_x) == test_y).mean())
    lines = [f"Public model `{ldm_path}`, {args.per_class} samples per class, seed {args.seed}; machine {platform.machine()}, "
             f"{args.threads} threads. Everything from the public set `{args.public_data}`: the domain CNN trained on its "
             f"train split (test accuracy {test_fit:.3f}); FID, precision and recall of {per_test} samples per class "
             f"against its {per_test * k}-image held-out test split; the TSTR CNN tested on that split. "
             "No private or proxy data read.", "",
             "| setting | label consistency | fid_domain | precision | recall | CNN trained on samples, acc. on public test "
             "| s per 1k samples |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += ["| {} | {:.3f} | {:.1f} | {:.3f} | {:.3f} | {:.3f} | {:.1f} |".format(*r) for r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
