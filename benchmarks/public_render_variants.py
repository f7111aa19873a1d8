"""Variants of the public printed digits (``fontdigits``), for judging the public data itself on the public proxy.

Writes a public image set as ``prepare_public`` does (Parquet + manifest + grid + DVCLive), rendered with a changed
augmentation. The rest of the comparison is the stages' own CLIs and ``finetune_sweep.py`` (docs/results.md,
"Issue 14: the public digits themselves"): encode the variant with the default public autoencoder (one latent
space, so that held-out losses compare), pretrain the LDM on it, DP fine-tune on the proxy.

    python benchmarks/public_render_variants.py --variant pen --out DIR   # DIR/images.parquet, manifest.json, grid.png
    python benchmarks/public_render_variants.py --variant pen --out DIR --count 5000 --seed 7 --imagefolder build/proxy_pen
        # also every image as build/proxy_pen/<digit>/<n>.png, the layout of data.*.source: imagefolder
        # (benchmarks/profiles/public_proxy_pen.yaml: tried as a proxy for the private set, too easy to judge choices)

Variants (the default draws are those of ``dpldm.data._draw_digit``: stroke 0-2 px, elastic alpha U(0, 30)):
  ``default``  unchanged (a check: the same bytes as ``prepare_public``);
  ``wild``     thicker and more distorted: stroke 0-3 px, elastic alpha U(10, 40); since 2026-12-06 a setting of
               params.yaml (``data.public.font_stroke: [0, 3]``, ``data.public.font_elastic_alpha: [10, 40]``), which
               this script writes into its copy of the params;
  ``pen``      half of the digits redrawn with a round pen (radius U(2, 4) px on the 64-px canvas) along the glyph's
               skeleton (Zhang & Suen thinning): uniform strokes, as handwriting, in place of the fonts' serifs and
               thick-thin contrast.

Renders in one process (the variants patch ``dpldm.data`` in this process; worker processes would not see it)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dpldm.data as data  # noqa: E402
from stages.prepare import run_prepare  # noqa: E402

VARIANTS = ("default", "wild", "pen")


def zhang_suen(img: np.ndarray) -> np.ndarray:
    """Zhang & Suen (1984) thinning of a boolean image to a one-pixel skeleton (both sub-iterations, vectorised)."""
    x = np.pad(img.astype(bool), 1)
    while True:
        changed = False
        for step in (0, 1):
            p2, p3, p4, p5 = x[:-2, 1:-1], x[:-2, 2:], x[1:-1, 2:], x[2:, 2:]
            p6, p7, p8, p9 = x[2:, 1:-1], x[2:, :-2], x[1:-1, :-2], x[:-2, :-2]
            ring = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
            b = sum(n.astype(np.uint8) for n in ring[:8])  # foreground neighbours
            a = sum(((~ring[i]) & ring[i + 1]).astype(np.uint8) for i in range(8))  # 0 -> 1 transitions around
            c1, c2 = ((~(p2 & p4 & p6), ~(p4 & p6 & p8)) if step == 0 else (~(p2 & p4 & p8), ~(p2 & p6 & p8)))
            core = x[1:-1, 1:-1]
            remove = core & (b >= 2) & (b <= 6) & (a == 1) & c1 & c2
            if remove.any():
                changed = True
                core[remove] = False
        if not changed:
            return x[1:-1, 1:-1]


def pen_stroke(arr: np.ndarray, radius: float) -> np.ndarray:
    """A glyph (float 0..255) redrawn along its skeleton with a round pen of ``radius`` px (1-px soft edge)."""
    distance = ndimage.distance_transform_edt(~zhang_suen(arr > 127))
    return np.clip((radius + 0.5 - distance) * 255, 0, 255).astype(np.float32)


WILD = {"font_stroke": [0, 3], "font_elastic_alpha": [10, 40]}  # since the params keys exist: a setting, not a patch


class PenAlpha(float):
    """The elastic alpha of one draw, carrying its pen radius ``pen`` through ``_render_digits``' scaling."""
    def __new__(cls, value: float, pen: float):
        obj = super().__new__(cls, value)
        obj.pen = pen
        return obj

    def __mul__(self, other):
        return PenAlpha(float(self) * other, self.pen)

    def __truediv__(self, other):
        return PenAlpha(float(self) / other, self.pen)


def draw_pen(rng: np.random.Generator, label: int, n_fonts: int, *, stroke: tuple[int, int] = data.FONT_STROKE,
             elastic_alpha: tuple[float, float] = data.FONT_ELASTIC_ALPHA) -> tuple:
    """The params' draws, then the pen: radius U(2, 4) for half of the digits, 0 (no pen) for the rest."""
    f, stroke = int(rng.integers(n_fonts)), int(rng.integers(stroke[0], stroke[1] + 1))
    angle, shear, width = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(-0.15, 0.4), rng.uniform(0.8, 1.2)
    alpha = rng.uniform(*elastic_alpha)
    pen = rng.uniform(2.0, 4.0) if rng.random() < 0.5 else 0.0
    return int(label), f, stroke, angle, shear, width, PenAlpha(alpha, pen), [rng.uniform(-1, 1, (data._BIG, data._BIG)) for _ in range(2)]


def with_pen(elastic):
    """``elastic_distort`` that first redraws the glyph with the pen its draw carries (after the affine transform)."""
    def distort(image, fields, *, alpha, sigma):
        if getattr(alpha, "pen", 0.0) > 0:
            image = pen_stroke(image, alpha.pen)
        return elastic(image, fields, alpha=float(alpha), sigma=sigma)
    return distort


def apply_variant(name: str, params: dict | None = None) -> None:
    """Patches ``dpldm.data`` for ``pen``; ``wild`` writes its ranges into ``params["data"]["public"]``."""
    if name == "wild":
        if params is None:
            raise ValueError("the wild variant is a setting of params.yaml: pass the params to change")
        params["data"]["public"].update(WILD)
    elif name == "pen":
        data._draw_digit = draw_pen
        data.elastic_distort = with_pen(data.elastic_distort)


def export_imagefolder(images: np.ndarray, labels: np.ndarray, class_names: list[str], folder: Path) -> int:
    """Every image (uint8 [N, H, W, C], C = 1 or 3) as ``folder/<class name>/<n>.png``, the layout ``data.*.source:
    imagefolder`` reads. Returns the number written."""
    from PIL import Image

    for name in class_names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for n, (img, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / class_names[int(label)] / f"{n:05d}.png")
    return len(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--out", required=True, help="folder for images.parquet, manifest.json, grid.png, live/")
    ap.add_argument("--count", type=int, default=0, help="digits to render (default: data.public.count); the Parquet's "
                    "held-out split is then a tenth of them (data.public.n_test); --imagefolder writes every digit")
    ap.add_argument("--seed", type=int, default=None, help="render seed (default: runtime.seeds.prepare_public); another seed "
                    "gives other draws of font, distortion and pen")
    ap.add_argument("--imagefolder", default="", help="also write every image as IMAGEFOLDER/<digit>/<n>.png")
    args = ap.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    params["runtime"]["threads"] = 1  # one process: the patch below lives in this one
    if args.count:
        params["data"]["public"]["count"] = args.count
        params["data"]["public"]["n_test"] = max(1, args.count // 10)
    if args.seed is not None:
        params["runtime"]["seeds"]["prepare_public"] = args.seed
    apply_variant(args.variant, params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = run_prepare(params, {"data": str(out / "images.parquet"), "manifest": str(out / "manifest.json"),
                                   "grid": str(out / "grid.png"), "live": str(out / "live")}, which="public")
    print(args.variant, metrics)
    if args.imagefolder:
        from stages.common import read_images

        x, y, meta = read_images(out / "images.parquet")
        print(f"wrote {export_imagefolder(x, y, meta['class_names'], Path(args.imagefolder))} images under {args.imagefolder}")


if __name__ == "__main__":
    main()
