"""Shared by ``reference`` and ``score_classifier``: fit the three downstream classifiers on a
training set with model selection on a validation split carved from that *same* set, and only then
read and score the real test split."""
from __future__ import annotations

from typing import Callable

import numpy as np

from dpldm.config import ClassifierConfig, FIDConfig
from dpldm.metrics import Augment, confusion, fit_sklearn, predict, sklearn_predict, train_cnn


def split_validation(x: np.ndarray, y: np.ndarray, *, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    n_val = max(int(round(fraction * len(y))), len(np.unique(y)))  # at least one per class
    tr, va = train_test_split(idx, test_size=n_val, stratify=y, random_state=seed)
    return x[tr], y[tr], x[va], y[va]


def fit_cnn(cfg: ClassifierConfig, xt, yt, xv, yv, *, num_classes: int, seed: int, augment: bool = True):
    """One downstream SmallCNN as ``fit_and_score`` trains it: ``cfg``'s epochs, batch, lr and augmentation, the epoch
    chosen on (xv, yv). ``augment=False``: the images as they are (the CNN of the figures measured before
    ``classifier.cnn_augment_*`` existed)."""
    return train_cnn(xt, yt, xv, yv, num_classes=num_classes, epochs=cfg.cnn_epochs, batch_size=cfg.cnn_batch_size,
                     lr=cfg.cnn_lr, seed=seed, augment=Augment.of(cfg) if augment else None)


def fit_domain_extractor(cfg: ClassifierConfig, fid_cfg: FIDConfig, xt, yt, xv, yv, *, num_classes: int, seed: int):
    """The FID domain feature extractor as the reference stage trains it: a SmallCNN with ``cfg``'s batch and lr,
    ``fid_cfg.domain_epochs`` epochs, no augmentation, the epoch chosen on (xv, yv)."""
    return train_cnn(xt, yt, xv, yv, num_classes=num_classes, epochs=fid_cfg.domain_epochs, batch_size=cfg.cnn_batch_size,
                     lr=cfg.cnn_lr, seed=seed)


def fit_mlp(cfg: ClassifierConfig, xt, yt, xv, yv, *, seed: int):
    """(model, alpha, validation accuracy) of the MLP as ``fit_and_score`` fits it."""
    return fit_sklearn("mlp", xt, yt, xv, yv, seed=seed, mlp_hidden=cfg.mlp_hidden, mlp_max_iter=cfg.mlp_max_iter)


def fit_logreg(cfg: ClassifierConfig, xt, yt, xv, yv, *, seed: int):
    """(model, C, validation accuracy) of the logistic regression as ``fit_and_score`` fits it."""
    return fit_sklearn("logreg", xt, yt, xv, yv, seed=seed, logreg_C=cfg.logreg_C)


def fit_and_score(cfg: ClassifierConfig, train_x: np.ndarray, train_y: np.ndarray, read_test: Callable[[], tuple],
                  *, num_classes: int, seed: int) -> tuple[dict, np.ndarray]:
    """Returns (metrics, confusion matrix of the first CNN seed). ``read_test`` is called once,
    after every model choice is made."""
    if cfg.max_train and len(train_y) > cfg.max_train:
        keep = np.random.default_rng(seed).choice(len(train_y), cfg.max_train, replace=False)
        train_x, train_y = train_x[keep], train_y[keep]
    xt, yt, xv, yv = split_validation(train_x, train_y, fraction=cfg.val_fraction, seed=seed)
    cnns = [fit_cnn(cfg, xt, yt, xv, yv, num_classes=num_classes, seed=seed + s) for s in range(cfg.seeds)]
    mlp, mlp_alpha, mlp_val = fit_mlp(cfg, xt, yt, xv, yv, seed=seed)
    lr, lr_c, lr_val = fit_logreg(cfg, xt, yt, xv, yv, seed=seed)
    # every choice is made: only now the real test split is read
    test_x, test_y = read_test()
    cnn_acc = [float((predict(r.model, test_x) == test_y).mean()) for r in cnns]
    metrics = {
        "cnn_accuracy": float(np.mean(cnn_acc)),
        **({"cnn_accuracy_std": float(np.std(cnn_acc))} if len(cnn_acc) > 1 else {}),  # one seed: no spread to report
        "cnn_val_accuracy": float(np.mean([r.val_accuracy for r in cnns])),
        "cnn_best_epochs": [r.best_epoch for r in cnns],
        "mlp_accuracy": float((sklearn_predict(mlp, test_x) == test_y).mean()), "mlp_alpha": mlp_alpha, "mlp_val_accuracy": mlp_val,
        "logreg_accuracy": float((sklearn_predict(lr, test_x) == test_y).mean()), "logreg_C": lr_c, "logreg_val_accuracy": lr_val,
        "n_train": int(len(yt)), "n_val": int(len(yv)), "n_test": int(len(test_y)),
    }
    return metrics, confusion(test_y, predict(cnns[0].model, test_x), num_classes)
