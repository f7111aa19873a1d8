import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from helpers import dataset
from dpldm.data import DataSourceError, load_source, mnist_normalize, render_font_digits, to_resolution
from stages.common import read_images, write_images


def test_fontdigits_deterministic_for_seed():
    a, la = render_font_digits(count=40, seed=1)
    b, lb = render_font_digits(count=40, seed=1)
    c, _ = render_font_digits(count=40, seed=2)
    assert a.tobytes() == b.tobytes() and (la == lb).all()
    assert a.tobytes() != c.tobytes()
    assert a.shape == (40, 28, 28, 1) and sorted(set(la.tolist())) == list(range(10))
    assert a.max() > 200  # strokes are drawn


def test_fontdigits_are_the_same_bytes_whatever_the_number_of_rendering_processes(monkeypatch):
    """One process draws every random choice in order; worker processes render chunks of them: the images
    may not depend on how many render, or on the chunking."""
    import dpldm.data as data

    serial, labels = render_font_digits(count=100, seed=4)
    monkeypatch.setattr(data, "_CHUNK", 15)  # 7 chunks: more than the two per worker kept waiting
    parallel, labels2 = render_font_digits(count=100, seed=4, workers=2)
    assert parallel.tobytes() == serial.tobytes() and (labels2 == labels).all()
    assert render_font_digits(count=100, seed=4, workers=1)[0].tobytes() == serial.tobytes()  # serial, chunked by 15


def test_fontdigits_stroke_and_distortion_ranges_change_the_draws_not_the_labels():
    """data.*.font_stroke / font_elastic_alpha: thicker strokes draw more ink; the defaults are the params' values, and
    every range consumes the random stream alike, so labels (drawn before) and later draws stay in step."""
    from dpldm.data import FONT_ELASTIC_ALPHA, FONT_STROKE

    base, labels = render_font_digits(count=60, seed=5)
    same, _ = render_font_digits(count=60, seed=5, stroke=FONT_STROKE, elastic_alpha=FONT_ELASTIC_ALPHA)
    thick, labels2 = render_font_digits(count=60, seed=5, stroke=(4, 4), elastic_alpha=FONT_ELASTIC_ALPHA)
    thin, _ = render_font_digits(count=60, seed=5, stroke=(0, 0), elastic_alpha=FONT_ELASTIC_ALPHA)
    assert same.tobytes() == base.tobytes() and (labels2 == labels).all()
    ink = [(x > 127).mean() for x in (thin, base, thick)]
    assert ink[0] < ink[1] < ink[2], ink
    flat, _ = render_font_digits(count=60, seed=5, stroke=FONT_STROKE, elastic_alpha=(0.0, 0.0))
    assert flat.tobytes() != base.tobytes()


def test_fontdigits_in_mnist_format():
    """Each glyph fits a 20x20 box and its centre of mass sits at the frame's centre, as in MNIST."""
    from scipy import ndimage

    x, _ = render_font_digits(count=30, seed=3)
    for img in x[..., 0].astype(np.float64):
        ys, xs = np.nonzero(img)
        assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 20 + 1  # anti-aliasing may bleed one pixel
        cy, cx = ndimage.center_of_mass(img)
        assert abs(cy - 14) <= 1.0 and abs(cx - 14) <= 1.0


def test_mnist_normalize_moves_an_off_centre_blob_to_the_centre():
    glyph = np.zeros((60, 60), np.float32)
    glyph[5:45, 40:50] = 255  # tall thin bar near the right edge
    out = mnist_normalize(glyph, box=20, size=28)
    ys, xs = np.nonzero(out > 127)
    assert ys.max() - ys.min() + 1 in (19, 20, 21)  # the long side is scaled to the box
    assert abs((xs.min() + xs.max()) / 2 - 14) <= 1.0
    with pytest.raises(ValueError, match="empty"):
        mnist_normalize(np.zeros((10, 10), np.float32))


def test_mnist5k_split_stratified_and_padded():
    d = load_source(dataset(source="mnist5k", n_train=400, n_test=100), seed=0)
    assert d.train.images.shape == (400, 32, 32, 1) and len(d.test) == 100
    assert np.bincount(d.train.labels).tolist() == [40] * 10
    assert d.train.images[:, :2].max() == 0  # zero padding 28 -> 32
    assert not set(d.train.source_index) & set(d.test.source_index)


def test_to_resolution_channels_and_resize():
    x = np.random.default_rng(0).integers(0, 255, (3, 28, 28, 1), dtype=np.uint8)
    assert to_resolution(x, size=32, channels=3).shape == (3, 32, 32, 3)
    assert to_resolution(x, size=64, channels=1).shape == (3, 64, 64, 1)
    rgb = np.full((1, 32, 32, 3), 100, np.uint8)
    assert to_resolution(rgb, size=32, channels=1)[0, 0, 0, 0] == 100


def _idx(path, arr):
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", 0x0800 + arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes())


def test_torchvision_mnist_from_real_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    d = load_source(dataset(source="MNIST", root=str(tmp_path)), seed=0)
    assert d.train.images.shape == (30, 32, 32, 1) and len(d.test) == 20


def test_missing_torchvision_files_name_them(tmp_path):
    with pytest.raises(DataSourceError, match="train-images-idx3-ubyte"):
        load_source(dataset(source="FashionMNIST", root=str(tmp_path)), seed=0)
    with pytest.raises(DataSourceError, match="data_batch_1"):
        load_source(dataset(source="CIFAR10", root=str(tmp_path), channels=3), seed=0)
    with pytest.raises(DataSourceError, match="train_32x32.mat"):
        load_source(dataset(source="SVHN", root=str(tmp_path), channels=3), seed=0)


def test_cifar10_from_real_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, fh)
    d = load_source(dataset(source="CIFAR10", root=str(tmp_path), channels=3), seed=0)
    assert d.train.images.shape == (20, 32, 32, 3) and d.test.images.shape == (4, 32, 32, 3)


def test_svhn_from_real_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", 12), ("test_32x32.mat", 5)):
        savemat(tmp_path / name, {"X": rng.integers(0, 255, (32, 32, 3, n), dtype=np.uint8), "y": (np.arange(n) % 10 + 1)[:, None]})
    d = load_source(dataset(source="SVHN", root=str(tmp_path), channels=1), seed=0)
    assert d.train.images.shape == (12, 32, 32, 1) and d.train.labels.max() == 9 and (d.train.labels == 0).sum() == 1


def test_celeba_from_real_layout(tmp_path):
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    for n in names:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(base / "img_align_celeba" / n)
    (base / "list_attr_celeba.txt").write_text("6\nMale Smiling\n" + "".join(f"{n} {1 if i % 2 else -1} -1\n" for i, n in enumerate(names)))
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {0 if i < 4 else 2}\n" for i, n in enumerate(names)))
    d = load_source(dataset(source="CelebA", root=str(tmp_path), channels=3, image_size=32), seed=0)
    assert d.train.images.shape == (4, 32, 32, 3) and d.train.labels.tolist() == [0, 1, 0, 1] and len(d.test) == 2


def _folder(tmp_path, n=6):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")


def test_imagefolder(tmp_path):
    _folder(tmp_path)
    d = load_source(dataset(source="imagefolder", root=str(tmp_path), channels=3, image_size=16, test_fraction=0.25), seed=0)
    assert d.class_names == ["cat", "dog"] and d.train.images.shape[1:] == (16, 16, 3) and len(d.train) + len(d.test) == 12


def test_imagefolder_unreadable_file_is_named(tmp_path):
    _folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataSourceError, match="broken.png"):
        load_source(dataset(source="imagefolder", root=str(tmp_path)), seed=0)


def test_parquet_roundtrip_schema(tmp_path):
    import pyarrow.parquet as pq

    x = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 1), dtype=np.uint8)
    write_images(tmp_path / "a.parquet", images=x, labels=np.arange(5), split=["train"] * 3 + ["test"] * 2,
                 source_index=np.arange(5) + 10, class_names=list("abcde"), source="t")
    schema = pq.read_schema(tmp_path / "a.parquet")
    assert [f.name for f in schema] == ["image", "label", "split", "source_index"]
    got, y, meta = read_images(tmp_path / "a.parquet", split="test")
    assert (got == x[3:]).all() and y.tolist() == [3, 4] and meta["channels"] == 1


@pytest.mark.parametrize("case", ["corrupt", "layout", "missing"])
def test_stage_reports_user_data_errors_in_one_line(tmp_path, case):
    """A corrupt image, a bad folder layout or a missing data set file ends the stage with one line that
    names the file and the fix (exit 2), not a traceback."""
    import subprocess
    import sys

    import yaml

    from helpers import ROOT, env, params

    root = tmp_path / "images"
    root.mkdir()
    if case == "corrupt":
        _folder(root)
        (root / "dog" / "broken.png").write_bytes(b"not a png")
        source, needle = "imagefolder", "broken.png"
    elif case == "layout":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "loose.png")
        source, needle = "imagefolder", "no class subfolders"
    else:
        source, needle = "CIFAR10", "data_batch_1"
    p = params()
    p["data"]["private"].update(source=source, root=str(root), channels=3 if source == "CIFAR10" else 1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    out = {k: str(tmp_path / k) for k in ("data", "manifest", "grid", "live")}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare_private", "--params", str(tmp_path / "params.yaml")]
                          + [f"--out={k}={v}" for k, v in out.items()], cwd=ROOT, env=env(), capture_output=True, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
