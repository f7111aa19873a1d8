import numpy as np
import pytest
import torch

from dpldm.metrics import SmallCNN, fidelity, register_domain_extractor, uint8_to_input
from stages.common import ConfigError


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    cnn = SmallCNN(channels=1, image_size=16, num_classes=10)
    return register_domain_extractor(cnn.state_dict(), {"channels": 1, "image_size": 16, "num_classes": 10})


def digits(n, seed):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 16, 16, 1), np.uint8)
    for i in range(n):
        r, c = rng.integers(2, 10, size=2)
        x[i, r:r + 5, c:c + 3] = 220
    return x


def test_domain_extractor_registers_with_declared_features(extractor):
    from torch_fidelity.utils import create_feature_extractor

    fe = create_feature_extractor(extractor, ["feat", "logits"], cuda=False)
    feat, logits = fe(torch.zeros(3, 3, 16, 16, dtype=torch.uint8))
    assert feat.shape == (3, SmallCNN.feature_dim) and logits.shape == (3, 10)
    # same weights register under the same name
    assert register_domain_extractor(fe.cnn.state_dict(), {"channels": 1, "image_size": 16, "num_classes": 10}) == extractor


def test_fid_and_kid_of_a_set_against_itself_is_zero_and_grow_with_noise(extractor):
    real = digits(300, 0)
    same = fidelity(real, real, extractor=extractor, tag="domain", kid_subset_size=100)
    assert abs(same["fid_domain"]) < 1e-3 and abs(same["kid_domain_mean"]) < 1e-3
    scores = []
    for sigma in (20, 80):
        noisy = np.clip(real.astype(np.float32) + np.random.default_rng(1).normal(0, sigma, real.shape), 0, 255).astype(np.uint8)
        scores.append(fidelity(noisy, real, extractor=extractor, tag="domain", kid_subset_size=100))
    assert 1e-3 < scores[0]["fid_domain"] < scores[1]["fid_domain"]
    assert scores[0]["kid_domain_mean"] < scores[1]["kid_domain_mean"]
    assert set(same) == {"fid_domain", "kid_domain_mean", "kid_domain_std"}  # never a bare 'fid'


def test_missing_inception_weights_give_the_documented_error(tmp_path):
    from helpers import cfg
    from stages.score_fid import inception_weights

    with pytest.raises(ConfigError) as err:
        inception_weights(cfg("fid", extractor="inception-v3-compat", inception_weights=str(tmp_path / "nope.pth")))
    msg = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "fid.extractor: domain" in msg and "fid.inception_weights" in msg
    (tmp_path / "w.pth").write_bytes(b"x")
    assert inception_weights(cfg("fid", extractor="inception-v3-compat", inception_weights=str(tmp_path / "w.pth"))).endswith("w.pth")


def test_classifier_selection_never_reads_the_real_test_split():
    """fit_and_score must make every choice before it calls read_test; a read_test that records
    what was fitted by then proves it."""
    import stages.classify as classify
    from helpers import cfg

    x = digits(200, 2)
    y = np.arange(200) % 10
    events = []
    real_train, real_fit = classify.train_cnn, classify.fit_sklearn
    classify.train_cnn = lambda *a, **k: (events.append("cnn"), real_train(*a, **k))[1]
    classify.fit_sklearn = lambda *a, **k: (events.append(a[0]), real_fit(*a, **k))[1]
    try:
        def read_test():
            events.append("test")
            return digits(50, 3), np.arange(50) % 10

        metrics, cm = classify.fit_and_score(cfg("classifier", cnn_epochs=1, seeds=2, mlp_max_iter=5, mlp_hidden=8), x, y,
                                             read_test, num_classes=10, seed=0)
    finally:
        classify.train_cnn, classify.fit_sklearn = real_train, real_fit
    assert events == ["cnn", "cnn", "mlp", "logreg", "test"]
    assert 0 <= metrics["cnn_accuracy"] <= 1 and cm.sum() == 50
    assert metrics["cnn_accuracy_std"] >= 0  # two seeds: their spread is reported
    one, _ = classify.fit_and_score(cfg("classifier", cnn_epochs=1, seeds=1, mlp_max_iter=5, mlp_hidden=8), x, y,
                                    lambda: (digits(50, 3), np.arange(50) % 10), num_classes=10, seed=0)
    assert "cnn_accuracy_std" not in one and 0 <= one["cnn_accuracy"] <= 1  # one seed: no spread to report, not a 0


def test_the_shared_classifier_fits_pass_their_configs_settings(monkeypatch):
    """fit_cnn / fit_domain_extractor / fit_mlp / fit_logreg (what the stages and the benchmarks share) hand
    train_cnn and fit_sklearn the settings of their config sections, augmentation where asked for."""
    import stages.classify as classify
    from dpldm.metrics import Augment
    from helpers import cfg

    calls = []
    monkeypatch.setattr(classify, "train_cnn", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(classify, "fit_sklearn", lambda kind, *a, **k: calls.append({"kind": kind, **k}))
    ccfg = cfg("classifier", cnn_epochs=3, cnn_batch_size=16, cnn_lr=0.01, cnn_augment_shift=0.1, mlp_hidden=8, mlp_max_iter=5)
    fcfg = cfg("fid", domain_epochs=7)
    data = (None,) * 4
    classify.fit_cnn(ccfg, *data, num_classes=10, seed=2)
    classify.fit_cnn(ccfg, *data, num_classes=10, seed=2, augment=False)
    classify.fit_domain_extractor(ccfg, fcfg, *data, num_classes=10, seed=2)
    classify.fit_mlp(ccfg, *data, seed=2)
    classify.fit_logreg(ccfg, *data, seed=2)
    cnn, plain, domain, mlp, logreg = calls
    assert (cnn["epochs"], cnn["batch_size"], cnn["lr"], cnn["seed"]) == (3, 16, 0.01, 2)
    assert cnn["augment"] == Augment.of(ccfg) and cnn["augment"].shift == 0.1
    assert plain["augment"] is None and {**plain, "augment": None} == {**cnn, "augment": None}
    assert domain["epochs"] == 7 and domain.get("augment") is None and domain["batch_size"] == 16
    assert mlp["kind"] == "mlp" and (mlp["mlp_hidden"], mlp["mlp_max_iter"]) == (8, 5)
    assert logreg["kind"] == "logreg" and logreg["logreg_C"] == ccfg.logreg_C


def test_label_consistency_counts_the_classifier_agreeing_with_the_conditioning_labels():
    from dpldm.metrics import label_consistency

    class ByBrightness(torch.nn.Module):  # predicts class c for an image of constant grey level 20 c
        def forward(self, x):
            level = (x.mean((1, 2, 3)) + 1) * 127.5
            return -(level[:, None] - 20 * torch.arange(10.0)[None]).abs()

    classes = np.repeat(np.arange(10), 5)
    images = np.broadcast_to((20 * classes).astype(np.uint8)[:, None, None, None], (50, 8, 8, 1)).copy()
    labels = classes.copy()
    labels[[0, 1, 2, 7]] = 9  # three images of class 0 and one of class 1 conditioned on the wrong label
    out = label_consistency(ByBrightness(), images, labels)
    assert out["label_consistency"] == pytest.approx(46 / 50)
    assert out["label_consistency_min_class"] == pytest.approx(5 / 9)  # label 9: its 5 images and 4 wrongly labelled
    with pytest.raises(ValueError, match="no images"):
        label_consistency(ByBrightness(), images[:0], labels[:0])


def test_small_cnn_from_state_dict_rebuilds_the_saved_network():
    torch.manual_seed(0)
    saved = SmallCNN(channels=1, image_size=16, num_classes=10).eval()
    again = SmallCNN.from_state_dict(saved.state_dict(), {"channels": 1, "image_size": 16, "num_classes": 10}).eval()
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(saved(x), again(x))
    with pytest.raises(RuntimeError):  # a conf that does not match the weights is refused, not silently reshaped
        SmallCNN.from_state_dict(saved.state_dict(), {"channels": 1, "image_size": 32, "num_classes": 10})


@pytest.mark.parametrize("kind, default_cap", [("logreg", 1), ("mlp", None)])
def test_sklearn_grid_caps_blas_threads_for_logreg_only_and_the_cap_keeps_the_choice(monkeypatch, kind, default_cap):
    """The logistic regression fits on one BLAS thread by default (4x faster here, benchmarks/sklearn_threads.py);
    the MLP keeps BLAS as it is; an explicit cap applies to both. The cap does not change what is chosen."""
    import threadpoolctl
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    from dpldm.metrics import fit_sklearn

    cls = LogisticRegression if kind == "logreg" else MLPClassifier
    seen, real_fit = [], cls.fit

    def blas():
        return max(p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas")

    def spy(self, *a, **k):
        seen.append(blas())
        return real_fit(self, *a, **k)

    monkeypatch.setattr(cls, "fit", spy)
    rng = np.random.default_rng(0)
    x, y = digits(120, 0), rng.integers(0, 3, 120)
    x[y == 1, :4] = 255  # a learnable signal
    uncapped = blas()
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = blas()
        _, choice, acc = fit_sklearn(kind, x[:90], y[:90], x[90:], y[90:], seed=0, mlp_hidden=8, mlp_max_iter=5)
        assert seen and set(seen) == {default_cap or before}
        seen.clear()
        _, choice1, acc1 = fit_sklearn(kind, x[:90], y[:90], x[90:], y[90:], seed=0, mlp_hidden=8, mlp_max_iter=5,
                                       blas_threads=1)
        assert set(seen) == {1}
    assert (choice1, acc1) == (choice, acc)
    assert blas() == uncapped


def test_small_cnn_pools_before_relu_with_the_same_outputs_and_gradients_as_relu_then_pool():
    """SmallCNN applies ReLU after max-pooling (a quarter of the values): bit for bit the outputs and parameter
    gradients of the textbook order, on digits with flat zero backgrounds (ties in every pooling window) and noise."""
    import copy

    from torch import nn

    torch.manual_seed(0)
    fast = SmallCNN(channels=1, image_size=32, num_classes=10)
    assert [type(m) for m in list(fast.features)[:6]] == [nn.Conv2d, nn.MaxPool2d, nn.ReLU] * 2
    textbook = copy.deepcopy(fast)
    m = list(textbook.features)
    textbook.features = nn.Sequential(m[0], m[2], m[1], m[3], m[5], m[4], *m[6:])  # conv, ReLU, pool (x2)
    assert textbook.state_dict().keys() == fast.state_dict().keys()  # the swap moves no parameter
    images = np.zeros((16, 32, 32, 1), np.uint8)
    images[:8, 8:24, 12:20] = 255  # flat strokes on a flat background
    images[8:] = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 1))
    x, y = uint8_to_input(images), torch.arange(16) % 10
    for model in (fast, textbook):
        model.eval()  # no dropout: the same function
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.equal(fast(x), textbook(x))
    grads = dict(textbook.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad.any() and torch.equal(p.grad, grads[name].grad), name


def test_the_classifier_stages_import_neither_torch_fidelity_nor_torchvision():
    """reference and score_classifier train classifiers and never compute a FID: torch-fidelity (which pulls
    torchvision's model zoo and CLIP) is imported only where a FID is computed, not at each such stage's start."""
    import subprocess
    import sys

    code = ("import sys, stages.reference, stages.score_classifier; "
            "print(sorted(m for m in ('torch_fidelity', 'torchvision', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_affine_augmentation_moves_images_as_declared():
    from dpldm.metrics import Augment, apply_affine, random_affine, random_theta

    x = torch.full((2, 1, 8, 8), -1.0)
    x[:, :, 2:5, 3:5] = 1.0
    # a shift of exactly one pixel (2 / 8 in affine_grid's [-1, 1] coordinates) is a pixel roll with background let in
    theta = torch.tensor([[[1.0, 0.0, 2 / 8], [0.0, 1.0, 0.0]]] * 2)
    expected = torch.full_like(x, -1.0)
    expected[..., :-1] = x[..., 1:]
    assert torch.allclose(apply_affine(x, theta), expected, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    assert random_affine(x, Augment(), g) is x  # all ranges 0: no augmentation, nothing drawn
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(0)))
    # every draw stays within its range: angle, zoom and shift recovered from the matrices
    aug = Augment(shift=0.1, rotate=15.0, scale=0.2)
    th = random_theta(2000, aug, torch.Generator().manual_seed(1))
    zoom = 1 / th[:, 0, :2].norm(dim=1)
    angle = torch.rad2deg(torch.atan2(th[:, 1, 0], th[:, 0, 0]))
    assert zoom.min() >= 0.8 - 1e-5 and zoom.max() <= 1.2 + 1e-5 and zoom.std() > 0.05
    assert angle.abs().max() <= 15 + 1e-4 and angle.std() > 5
    assert th[:, :, 2].abs().max() <= 0.2 + 1e-6 and th[:, :, 2].std() > 0.05
    # background stays background, and two copies of one image are moved differently
    blank = torch.full((4, 1, 8, 8), -1.0)
    assert torch.allclose(random_affine(blank, aug, g), blank, atol=1e-6)
    moved = random_affine(x, aug, g)
    assert not torch.allclose(moved[0], moved[1])


def test_train_cnn_without_augmentation_is_unchanged_by_an_inactive_augment_and_changed_by_an_active_one():
    from dpldm.metrics import Augment, train_cnn

    x = digits(120, 4)
    y = np.arange(120) % 10
    kw = dict(num_classes=10, epochs=2, batch_size=32, lr=1e-3, seed=0)
    base = train_cnn(x[:100], y[:100], x[100:], y[100:], **kw)
    same = train_cnn(x[:100], y[:100], x[100:], y[100:], augment=Augment(), **kw)
    moved = train_cnn(x[:100], y[:100], x[100:], y[100:], augment=Augment(shift=0.1), **kw)
    assert base.history == same.history
    assert moved.history[0]["train_loss"] != base.history[0]["train_loss"]


def test_classifier_augmentation_keys_are_validated():
    from helpers import cfg

    for key, bad in (("cnn_augment_shift", 0.6), ("cnn_augment_rotate", -1.0), ("cnn_augment_scale", 1.0)):
        with pytest.raises(ConfigError, match=f"classifier.{key}"):
            cfg("classifier", **{key: bad})


def test_augmented_images_keep_the_decoded_images_strides():
    """The SmallCNN's kernels are chosen by the input's strides: augmented batches keep uint8_to_input's (channels
    last), on which its forward runs about twice as fast as on NCHW strides."""
    from dpldm.metrics import Augment, random_affine

    for channels in (1, 3):
        x = uint8_to_input(np.zeros((4, 8, 8, channels), np.uint8))
        moved = random_affine(x, Augment(shift=0.1, rotate=10.0), torch.Generator().manual_seed(0))
        assert moved.stride() == x.stride() and moved.shape == x.shape
