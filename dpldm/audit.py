"""Empirical privacy audit of DP-SGD in one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

m canaries, each included with probability 1/2 (the auditor's secret bits). The auditor scores every
canary after training, guesses "in" for the ``k_pos`` highest scores and "out" for the ``k_neg``
lowest, abstains on the rest, and turns the number of correct guesses into a lower bound on epsilon
at a chosen confidence: a mechanism that is (eps, delta)-DP makes many correct guesses unlikely.

White-box gradient canaries (the strongest setting for DP-SGD): canary i is a gradient that is zero
except at one coordinate ``coords[i]`` of the trainable parameters (a Dirac canary), of norm
``raw_norm``. At every logical step each included canary is Poisson-sampled at the real examples'
rate and, when sampled, enters the optimizer as K rows (one per noise-multiplicity copy) *before*
the K rows are averaged, clipped and noised, so the whole mechanism is exercised. Its score is the
sum over steps of the noisy gradient at its coordinate, which the white-box auditor sees.

A lower bound above the claimed epsilon means a bug (noise not added, clipping skipped, K copies
clipped separately, a wrong accountant). A bound below it proves nothing: the audit is a bug
detector, not a certificate.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats


# ----------------------------------------------------------------------------------------------
# The bound


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v correct of r guesses] for an (epsilon, delta)-DP mechanism over m canaries included with
    probability 1/2 (Steinke et al. 2023, Theorem 3.1 and its algorithm): the binomial tail of
    eps-randomized response, plus the delta term."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, tail = 0.0, 0.0  # alpha = max_i P[v > Binomial(r, q) >= v - i] / i
    for i in range(1, v + 1):
        tail += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, tail / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses reject at ``confidence``: the mechanism is
    not (epsilon, delta)-DP for any smaller epsilon, except with probability 1 - confidence."""
    p = 1.0 - confidence
    if r == 0 or p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < p:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return lo
    for _ in range(40):  # bisection: p_value(lo) < p <= p_value(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < p else (lo, mid)
    return lo


def guess_and_bound(scores: np.ndarray, included: np.ndarray, *, k_pos: int, k_neg: int, delta: float,
                    confidence: float = 0.95) -> dict:
    """Guess "in" for the k_pos highest scores and "out" for the k_neg lowest (the rest abstain); count
    the correct guesses and bound epsilon. ``k_pos`` and ``k_neg`` are fixed before looking at scores."""
    m = len(scores)
    if k_pos + k_neg > m:
        raise ValueError(f"k_pos + k_neg = {k_pos + k_neg} guesses exceed the m = {m} canaries")
    order = np.argsort(scores, kind="stable")
    out_idx, in_idx = order[:k_neg], order[m - k_pos:] if k_pos else order[:0]
    correct = int(included[in_idx].sum() + (~included[out_idx]).sum())
    r = k_pos + k_neg
    return {"canaries": m, "guesses": r, "correct": correct, "abstentions": m - r,
            "epsilon_lower_bound": epsilon_lower_bound(m=m, r=r, v=correct, delta=delta, confidence=confidence),
            "confidence": confidence}


# ----------------------------------------------------------------------------------------------
# White-box gradient canaries


class GradientCanaries:
    """Dirac gradient canaries over a list of parameters, injected into a ``KAveragedDPOptimizer``
    (which calls ``inject`` before it averages its rows per example and ``observe`` after adding noise).
    A canary is an example of ``k`` rows, as the training data's examples are; the rows already folded
    into one by the per-sample-gradient module (``optimizer.folded``) arrive as one row.

    ``generator`` drives the auditor's secrets: the inclusion bits, the coordinates and the canaries'
    Poisson sampling. ``raw_norm`` (default 10 x clip norm) is the canary gradient's norm before clipping.
    """

    def __init__(self, params: list[torch.nn.Parameter], *, m: int, sample_rate: float, k: int, raw_norm: float,
                 generator: torch.Generator):
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        if m > total:
            raise ValueError(f"audit.canaries = {m} exceeds the {total:,} trainable coordinates (one each)")
        self.params, self.k, self.sample_rate, self.raw_norm, self.generator = list(params), k, sample_rate, raw_norm, generator
        flat = torch.randperm(total, generator=generator)[:m]
        offsets = torch.tensor([0] + sizes).cumsum(0)
        self.param_of = torch.searchsorted(offsets, flat, right=True) - 1  # [m] which parameter
        self.index_in = flat - offsets[self.param_of]  # [m] coordinate inside it
        self.included = torch.rand(m, generator=generator) < 0.5  # [m] the secret bits
        self.scores = torch.zeros(m, dtype=torch.float64)
        self.injected = torch.zeros(m, dtype=torch.long)  # how often each canary entered a step
        self.steps = 0

    def inject(self, optimizer) -> None:
        """Append K rows per canary sampled this step to every parameter's per-row gradients."""
        sampled = torch.nonzero(self.included & (torch.rand(len(self.included), generator=self.generator) < self.sample_rate))
        sampled = sampled.flatten()
        self.injected[sampled] += 1
        folded = optimizer.folded
        if self.k % folded:
            raise ValueError(f"canaries of {self.k} rows cannot pass a module that folds {folded} rows per example")
        k = self.k // folded  # rows per canary as the optimizer receives them
        n_rows = len(sampled) * k
        for pi, p in enumerate(self.params):
            g = optimizer._get_flat_grad_sample(p)  # [rows, *p.shape]
            extra = torch.zeros(n_rows, p.numel(), dtype=g.dtype, device=g.device)
            for j, c in enumerate(sampled.tolist()):
                if int(self.param_of[c]) == pi:
                    extra[j * k:(j + 1) * k, int(self.index_in[c])] = self.raw_norm  # K adjacent rows
            p.grad_sample = torch.cat([g, extra.view(n_rows, *p.shape)])

    def observe(self, optimizer) -> None:
        """After noise: each canary's coordinate of the noisy summed gradient."""
        self.steps += 1
        for pi, p in enumerate(self.params):
            mine = self.param_of == pi
            if mine.any():
                self.scores[mine] += p.grad.detach().reshape(-1)[self.index_in[mine]].double().cpu()

    def result(self, *, k_pos: int, k_neg: int, delta: float, confidence: float = 0.95) -> dict:
        out = guess_and_bound(self.scores.numpy(), self.included.numpy(), k_pos=k_pos, k_neg=k_neg, delta=delta,
                              confidence=confidence)
        out["steps_observed"] = self.steps
        return out


# ----------------------------------------------------------------------------------------------
# Black-box membership


def membership_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray, *, fpr: float = 0.01) -> dict:
    """AUC and TPR at ``fpr`` of the rule "member if the score is high" (scores: e.g. minus the loss)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[member_scores, nonmember_scores]
    f, t, _ = roc_curve(y, s)
    return {"membership_auc": float(roc_auc_score(y, s)), f"membership_tpr_at_{fpr:g}_fpr": float(np.interp(fpr, f, t))}


def balanced_subset(labels: np.ndarray, n: int, *, seed: int) -> np.ndarray:
    """Indices of a seeded, class-balanced subset of at most ``n`` examples (as equal per class as the data
    allow). Members and non-members must be compared on the same class mix: splits stored class by class
    would otherwise compare classes, not membership."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    picked: list[int] = []
    k = 0
    while len(picked) < min(n, len(labels)):
        for idx in per_class:  # round robin over the classes
            if k < len(idx) and len(picked) < n:
                picked.append(int(idx[k]))
        k += 1
    return np.sort(np.asarray(picked, dtype=np.int64))


@torch.no_grad()
def denoising_losses(model, z: torch.Tensor, y: torch.Tensor, *, scheduler, draws: int, batch_size: int,
                     seed: int, device="cpu") -> np.ndarray:
    """Each example's eps-prediction loss averaged over ``draws`` fixed (t, noise) pairs: [N]. The same
    draws for every example (seeded), so scores differ only through the model's fit."""
    from .diffusion import q_sample

    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (draws,), generator=g)
    noise = torch.randn(draws, *z.shape[1:], generator=g)
    out = []
    for i in range(0, len(z), batch_size):
        zb, yb = z[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        total = torch.zeros(len(zb), device=device)
        for d in range(draws):
            tb = t[d].expand(len(zb)).to(device)
            nb = noise[d].expand_as(zb).to(device)
            pred = model(q_sample(scheduler, zb, nb, tb), tb, yb)
            total += (pred - nb).pow(2).flatten(1).mean(1)
        out.append((total / draws).cpu())
    return torch.cat(out).numpy()
