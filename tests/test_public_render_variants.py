"""benchmarks/public_render_variants.py: the thinning, the pen, and the variants' renders (tiny counts)."""
from __future__ import annotations

import sys

import numpy as np

import dpldm.data as data
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import public_render_variants as prv  # noqa: E402


def test_zhang_suen_leaves_a_one_pixel_skeleton_inside_the_shape():
    img = np.zeros((30, 40), bool)
    img[10:17, 5:35] = True  # a 7-px thick bar
    img[5:25, 18:23] = True  # crossed by a 5-px thick one
    skeleton = prv.zhang_suen(img)
    assert skeleton.any() and not (skeleton & ~img).any()  # non-empty, inside the shape
    assert not (skeleton[:-1, :-1] & skeleton[1:, :-1] & skeleton[:-1, 1:] & skeleton[1:, 1:]).any()  # no 2x2 block
    assert skeleton[13, 8:30].sum() >= 18  # the long bar's centre line survives (its ends are eaten a little)
    assert skeleton.sum() < img.sum() // 4


def test_pen_stroke_draws_the_skeleton_with_a_uniform_width():
    img = np.zeros((40, 40), np.float32)
    img[15:25, 5:35] = 255.0  # 10-px thick bar
    for radius in (2.0, 3.5):
        column = prv.pen_stroke(img, radius)[:, 20]  # across the bar
        width = int((column > 127).sum())
        assert abs(width - (2 * radius + 1)) <= 1.5, (radius, width)
        assert column.max() == 255 and column.min() == 0


def test_variants_patch_the_renderer_and_change_the_digits(monkeypatch):
    monkeypatch.setattr(data, "_draw_digit", data._draw_digit)  # restored after the test
    monkeypatch.setattr(data, "elastic_distort", data.elastic_distort)
    default, labels = data.render_font_digits(count=30, seed=3)
    prv.apply_variant("default")
    assert np.array_equal(data.render_font_digits(count=30, seed=3)[0], default)
    prv.apply_variant("pen")
    pen, pen_labels = data.render_font_digits(count=30, seed=3)
    again, _ = data.render_font_digits(count=30, seed=3)
    assert np.array_equal(pen_labels, labels) and np.array_equal(pen, again)  # same classes, deterministic
    assert not np.array_equal(pen, default)
    params = {"data": {"public": {"font_stroke": [0, 2], "font_elastic_alpha": [0, 30]}}}
    prv.apply_variant("wild", params)
    assert params["data"]["public"] == prv.WILD
    alpha = prv.PenAlpha(3.0, 2.5) * 64 / 28  # the pen radius survives _render_digits' scaling of alpha
    assert alpha.pen == 2.5 and abs(float(alpha) - 3.0 * 64 / 28) < 1e-12


def test_export_imagefolder_round_trips_through_the_imagefolder_source(tmp_path):
    from helpers import dataset

    x, y = data.render_font_digits(count=20, seed=3)
    x = data.to_resolution(x, size=32, channels=1)
    names = [str(i) for i in range(10)]
    assert prv.export_imagefolder(x, y, names, tmp_path) == 20
    back, back_y, back_names = data._imagefolder(dataset(source="imagefolder", root=str(tmp_path), channels=1, image_size=32))
    assert back_names == names
    order = np.lexsort((np.arange(20), y))  # the reader goes class by class, files in name order
    assert np.array_equal(back, x[order]) and np.array_equal(back_y, y[order])
