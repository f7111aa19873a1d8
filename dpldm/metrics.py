"""Scores of synthetic images: FID/KID through torch-fidelity (Inception or a domain CNN as feature
extractor) and downstream accuracy of classifiers trained on synthetic data, tested on real data.

Model selection uses a held-out *synthetic* validation split only; the real test split is passed to
``evaluate`` after every choice is made (DEVELOPERS.md, invariant 5).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------------------------
# A small CNN: the downstream classifier, and (its penultimate layer) the domain feature extractor


class SmallCNN(nn.Module):
    feature_dim = 128

    def __init__(self, *, channels: int, image_size: int, num_classes: int):
        super().__init__()
        # pool, then ReLU: the same function and gradients as ReLU then pool (max commutes with a monotone map, and
        # both route the gradient to the window's first maximum), with the ReLU on a quarter of the values
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, self.feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W] in [-1, 1]
        return self.head(self.dropout(self.features(x)))

    @classmethod
    def from_state_dict(cls, state_dict: dict, conf: dict) -> SmallCNN:
        """The CNN saved with ``conf`` (its ``channels``, ``image_size``, ``num_classes``), weights loaded."""
        model = cls(channels=conf["channels"], image_size=conf["image_size"], num_classes=conf["num_classes"])
        model.load_state_dict(state_dict)
        return model


def uint8_to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@dataclass
class FitResult:
    model: nn.Module
    best_epoch: int  # chosen on the synthetic validation split
    val_accuracy: float
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, *, batch_size: int = 1000) -> np.ndarray:
    model.eval()
    out = [model(uint8_to_input(images[i:i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def label_consistency(classifier: nn.Module, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How well samples look like their class: the share of synthetic images that ``classifier`` (trained on
    real data) assigns to their conditioning label, over all images and for the worst class."""
    if len(images) == 0:
        raise ValueError("label_consistency: no images to score")
    labels = np.asarray(labels)
    hits = predict(classifier, images) == labels
    per_class = [float(hits[labels == c].mean()) for c in np.unique(labels)]
    return {"label_consistency": float(hits.mean()), "label_consistency_min_class": min(per_class)}


@dataclass(frozen=True)
class Augment:
    """Random affine augmentation of the downstream classifier's training images, drawn per image and per epoch:
    a shift of up to ``shift`` of the image size in each direction, a rotation of up to ``rotate`` degrees and a
    scale in [1 - ``scale``, 1 + ``scale``]. All zero: no augmentation (the images are used as they are)."""

    shift: float = 0.0
    rotate: float = 0.0
    scale: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.shift or self.rotate or self.scale)

    @classmethod
    def of(cls, cfg) -> Augment:
        """The augmentation a ``ClassifierConfig`` (params.yaml's ``classifier``) asks for."""
        return cls(shift=cfg.cnn_augment_shift, rotate=cfg.cnn_augment_rotate, scale=cfg.cnn_augment_scale)


def random_theta(n: int, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """[n, 2, 3] affine maps in ``F.affine_grid``'s convention, each drawn uniformly within ``aug``'s ranges."""
    u = lambda: torch.rand(n, generator=generator) * 2 - 1  # noqa: E731  (uniform in [-1, 1])
    angle = u() * (aug.rotate * np.pi / 180.0)
    zoom = 1.0 + u() * aug.scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid's coordinates span [-1, 1]: a shift of s of the image size is 2 s there
    tx, ty = u() * 2 * aug.shift, u() * 2 * aug.shift
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``x`` [B, C, H, W] in [-1, 1] (background -1) resampled along ``theta`` [B, 2, 3]: output pixel p takes
    the input at theta p (normalised coordinates); what comes in from outside the image is background."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    # sampled as x + 1, so that the zeros grid_sample pads with are the background -1
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    # returned with the strides uint8_to_input's images have (channels last, as decoded): the SmallCNN's forward runs
    # about 2x faster on them than on grid_sample's NCHW strides (one-channel images: the same bytes, other kernels;
    # benchmarks/small_cnn_strides.py)
    b, c, h, w = out.shape
    return torch.empty_strided(out.shape, (h * w * c, 1, w * c, c), dtype=out.dtype).copy_(out)


def random_affine(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """``x`` [B, C, H, W] in [-1, 1], each image moved by its own random affine map (``random_theta``)."""
    if not aug.active or len(x) == 0:
        return x
    return apply_affine(x, random_theta(len(x), aug, generator))


def train_cnn(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *, num_classes: int,
              epochs: int, batch_size: int, lr: float, seed: int, augment: Augment | None = None, progress=None) -> FitResult:
    """Adam on the train split (each batch moved by ``augment``'s random affine maps, if given); keeps the epoch
    with the best accuracy on the given validation split, which is never augmented."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(channels=train_x.shape[-1], image_size=train_x.shape[1], num_classes=num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = uint8_to_input(train_x), torch.from_numpy(train_y).long()
    aug = augment if augment is not None and augment.active else None
    g_aug = torch.Generator().manual_seed(seed + 7919) if aug else None  # its own stream: no augmentation, same batches
    best, history = None, []
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx] if aug is None else random_affine(x[idx], aug, g_aug)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().item() * len(idx)
        acc = float((predict(model, val_x) == val_y).mean())
        history.append({"epoch": epoch, "train_loss": total / len(y), "val_accuracy": acc})
        if best is None or acc > best[1]:
            best = (epoch, acc, copy.deepcopy(model.state_dict()))
        if progress is not None:
            progress(epoch, acc)
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(model, best[0], best[1], history)


def fit_sklearn(kind: str, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                seed: int, logreg_C: float = 0.1, mlp_hidden: int = 256, mlp_max_iter: int = 50,
                blas_threads: int | None = None):
    """``mlp`` or ``logreg`` on pixels in [0, 1]; the regularisation strength is chosen from a small
    grid around the configured value by accuracy on the validation split. Returns (model, choice, val_acc).
    ``blas_threads`` caps numpy/scipy's BLAS threads during the fits (None: one for the logistic regression,
    no cap for the MLP)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    flat = lambda a: a.reshape(len(a), -1).astype(np.float32) / 255.0
    xt, xv = flat(train_x), flat(val_x)
    best = None
    if kind == "logreg":
        grid = [logreg_C / 10, logreg_C, logreg_C * 10]
        make = lambda c: LogisticRegression(C=c, max_iter=200)
    elif kind == "mlp":
        grid = [1e-4, 1e-2]
        make = lambda a: MLPClassifier(hidden_layer_sizes=(mlp_hidden,), alpha=a, max_iter=mlp_max_iter, random_state=seed)
    else:
        raise ValueError(f"unknown classifier {kind!r}; expected 'mlp' or 'logreg'")
    # lbfgs runs about 4x faster on one BLAS thread than on two here, same choice (benchmarks/sklearn_threads.py)
    cap = blas_threads if blas_threads is not None else (1 if kind == "logreg" else None)
    for value in grid:
        with threadpool_limits(limits=cap, user_api="blas") if cap else contextlib.nullcontext():
            model = make(value).fit(xt, train_y)
        acc = float((model.predict(xv) == val_y).mean())
        if best is None or acc > best[2]:
            best = (model, value, acc)
    return best


def sklearn_predict(model, images: np.ndarray) -> np.ndarray:
    return model.predict(images.reshape(len(images), -1).astype(np.float32) / 255.0)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


# ----------------------------------------------------------------------------------------------
# FID / KID with torch-fidelity


class UInt8Images(torch.utils.data.Dataset):
    """uint8 [N, H, W, C] as torch-fidelity wants it: uint8 [3, H, W] (grey repeated to 3 channels)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def register_domain_extractor(state_dict: dict, conf: dict) -> str:
    """Registers the trained SmallCNN's penultimate layer as a torch-fidelity feature extractor; ``conf`` as for
    ``SmallCNN.from_state_dict``. Returns its registry name, which includes a hash of the weights (same weights,
    same name)."""
    # torch-fidelity is imported where it is used: at module level it pulled torchvision's model zoo and CLIP into
    # every stage that trains a downstream classifier (reference, score_classifier), which never computes a FID
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().numpy().tobytes())
    name = f"dpldm-domain-{h.hexdigest()[:12]}"
    if name in FEATURE_EXTRACTORS_REGISTRY:
        return name
    weights = {k: v.detach().clone() for k, v in state_dict.items()}
    channels, image_size = conf["channels"], conf["image_size"]
    conf = dict(conf)  # a copy: the registered class must not see later changes to the caller's dict

    class DomainExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.cnn = SmallCNN.from_state_dict(weights, conf)

        @staticmethod
        def get_provided_features_list():
            return ("feat", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"fid": "feat", "kid": "feat", "prc": "feat", "isc": "logits"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)

        def forward(self, x):  # uint8 [B, 3, H, W]
            x = x.float().div(127.5).sub(1)
            if channels == 1:
                x = x[:, :1]
            feat = self.cnn.features(x)
            out = {"feat": feat, "logits": self.cnn.head(feat)}
            return tuple(out[f] for f in self.features_list)

    register_feature_extractor(name, DomainExtractor)
    return name


def fidelity(synthetic: np.ndarray, real: np.ndarray, *, extractor: str, tag: str, kid_subset_size: int,
             precision_recall: bool = False, cuda: bool = False, weights_path: str | None = None,
             cache_root: str | None = None, real_cache_name: str | None = None) -> dict[str, float]:
    """FID and KID (and optionally precision/recall) between two uint8 image sets, with metric names
    that say which extractor produced them: ``fid_<tag>``, ``kid_<tag>_mean``, ... (never a bare 'fid')."""
    import torch_fidelity

    kwargs = dict(input1=UInt8Images(synthetic), input2=UInt8Images(real), fid=True, kid=True, prc=precision_recall,
                  feature_extractor=extractor, kid_subset_size=min(kid_subset_size, len(synthetic), len(real)),
                  cuda=cuda, verbose=False, batch_size=200,
                  # features in this process: torch-fidelity otherwise forks 4 DataLoader workers (on 2 cores, and
                  # after other threads, e.g. a Prefect harness, a forked worker can die); the images are in memory
                  save_cpu_ram=True)
    if extractor == "inception-v3-compat":
        kwargs["feature_extractor_weights_path"] = weights_path
    else:  # custom extractors declare their own feature layer
        kwargs["feature_layer_fid"] = kwargs["feature_layer_kid"] = "feat"
        if precision_recall:
            kwargs["feature_layer_prc"] = "feat"
    if cache_root and real_cache_name:
        kwargs.update(cache=True, cache_root=cache_root, input2_cache_name=real_cache_name)
    else:
        kwargs["cache"] = False
    raw = torch_fidelity.calculate_metrics(**kwargs)
    out = {
        f"fid_{tag}": float(raw["frechet_inception_distance"]),
        f"kid_{tag}_mean": float(raw["kernel_inception_distance_mean"]),
        f"kid_{tag}_std": float(raw["kernel_inception_distance_std"]),
    }
    if precision_recall:
        out[f"precision_{tag}"] = float(raw["precision"])
        out[f"recall_{tag}"] = float(raw["recall"])
    return out


def content_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
