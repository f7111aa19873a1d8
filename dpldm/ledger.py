"""The privacy ledger: what a fine-tuning run spent and what its output is. One dataclass that
``stages/dp_finetune.py`` writes (``reports/dp_finetune/ledger.json``) and the Prefect flow and the
sweep read; the attempt records that make a retry spend budget; the release stamp. No file I/O here.

Every attempt on the same private data (same latents hash) is a separate use of it: their epsilons add
up (basic composition). An attempt that trained on it without DP, or with seeded noise, voids the
guarantee: the total is then infinite. An attempt lost elsewhere (a pool worker that died with its
clone) is recorded with an unknown data hash and counts as a use of the same data at its target epsilon.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

from .config import FinetuneConfig

SECRET_NOISE = ("secret: torch.Generator seeded from os.urandom (64 bits, not a CSPRNG stream), opacus secure_mode "
                "noise (4 draws / 2); never stored")
ATTEMPTS = "attempts.json"  # the attempt records' file in dp_finetune's state folder
SEEDED_NOISE = "seeded from runtime.seeds.dp_finetune (finetune.reproducible_noise): NOT A DP RELEASE"


def release_of(cfg: FinetuneConfig) -> dict:
    """What the fine-tuned model is, stamped on the ledger, the model and everything made from it."""
    if cfg.mode == "none":
        return {"dp_release": False, "release": "public model (finetune.mode: none; no private data used)"}
    if not cfg.private:
        return {"dp_release": False, "release": "not a DP release: non-private fine-tuning on private data (finetune.private: false)"}
    if cfg.reproducible_noise:
        return {"dp_release": False, "release": "not a DP release: seeded noise (finetune.reproducible_noise: true)"}
    return {"dp_release": True, "release": f"DP release (epsilon {cfg.epsilon:g}, delta {cfg.delta:g})"}


@dataclass
class Ledger:
    """reports/dp_finetune/ledger.json. The fields up to ``sample_rate`` are fixed before training; the
    rest are filled in when the run completes."""

    dp_release: bool
    release: str
    private: bool  # trained on the private data with DP
    noise_source: str | None
    mode: str
    layers: list[int]
    train_embedder: bool
    selected_attention_modules: list[str]
    trainable_params: int
    total_params: int
    trainable_share: float
    N: int
    K: int
    expected_batch_size: int
    physical_batch_size: int
    epochs: int
    clip_norm: float
    accountant: str
    delta: float
    target_epsilon: float | None
    noise_multiplier: float
    sample_rate: float
    epsilon_spent: float | None = None  # the accountant's, after the run
    steps: int = 0
    attempt: int = 0  # how many attempts used this private data, this one included
    epsilon_spent_all_attempts: float | None = None  # basic composition over the attempts; inf = voided
    resumed_at_epoch: list[int] = field(default_factory=list)
    lora: dict | None = None  # mode lora: rank, alpha, targets
    adapter_params: list[str] = field(default_factory=list)  # mode lora: the adapter tensors that trained

    # what the Prefect ledger artifact shows, in this order
    SUMMARY = ("dp_release", "release", "private", "epsilon_spent", "target_epsilon", "epsilon_spent_all_attempts", "delta",
               "noise_multiplier", "sample_rate", "steps", "epochs", "N", "K", "clip_norm", "accountant", "noise_source",
               "trainable_params", "trainable_share", "attempt")
    # what the sweep's comparison table takes from each experiment's ledger
    SWEEP = ("private", "dp_release", "release", "epsilon_spent", "epsilon_spent_all_attempts", "attempt", "noise_multiplier", "steps",
             "trainable_params")

    @classmethod
    def from_dict(cls, d: dict) -> Ledger:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ledger has unknown keys {sorted(unknown)}: written by another version of dpldm?")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> list[dict]:
        return [{"quantity": k, "value": getattr(self, k)} for k in self.SUMMARY]

    @property
    def release_stamp(self) -> dict:
        """What the model and everything made from it carry."""
        return {"dp_release": self.dp_release, "release": self.release, "epsilon_spent": self.epsilon_spent, "delta": self.delta}


def total_epsilon(attempts: list[dict], data_sha: str) -> float:
    """Basic composition over every attempt on the same private data (``inf`` once one was not DP)."""
    total = 0.0
    for a in attempts:
        if not _counts(a, data_sha):
            continue
        # records from before secret noise have no "dp": their noise was seeded from params, so no epsilon held
        if not a.get("dp", False):
            return math.inf
        total += a["epsilon_spent"] if a["status"] == "completed" else a["target_epsilon"]
    return total


def uses_of(attempts: list[dict], data_sha: str) -> int:
    """Attempts that trained on this private data."""
    return len([a for a in attempts if _counts(a, data_sha)])


def _counts(attempt: dict, data_sha: str) -> bool:
    # data_sha None: an attempt lost with its machine; its data is unknown, so it counts as this data's
    return attempt["data_sha"] in (data_sha, None) and attempt.get("uses_private_data", True)


def new_attempt(ledger: Ledger, *, data_sha: str) -> dict:
    """The record of an attempt, appended before training starts (so a crash still counts it)."""
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "data_sha": data_sha, "private": ledger.private,
            "dp": ledger.dp_release, "uses_private_data": ledger.mode != "none",
            "target_epsilon": ledger.target_epsilon, "status": "started"}


def lost_attempt(cfg: FinetuneConfig, *, where: str) -> dict:
    """The record of an attempt that ran elsewhere and was lost before it completed (its worker died, and
    its clone, checkpoint and attempt records with it). It may have trained on the private data, so it
    counts as a use of it at its target epsilon: the ledger then never reports less than the truth."""
    uses = cfg.mode != "none"
    private = uses and cfg.private
    return {"started": None, "data_sha": None, "private": private, "dp": release_of(cfg)["dp_release"],
            "uses_private_data": uses, "target_epsilon": cfg.epsilon if private else None, "status": "lost", "where": where}


def complete(ledger: Ledger, attempts: list[dict], *, data_sha: str, epsilon_spent: float | None, steps: int) -> None:
    """Close the last attempt and fill in the ledger's outcome."""
    attempts[-1].update(status="completed", epsilon_spent=epsilon_spent, steps=steps)
    uses = ledger.mode != "none"
    ledger.epsilon_spent, ledger.steps = epsilon_spent, steps
    ledger.attempt = uses_of(attempts, data_sha) if uses else 0
    ledger.epsilon_spent_all_attempts = total_epsilon(attempts, data_sha) if uses else None
    ledger.resumed_at_epoch = list(attempts[-1].get("resumed_at_epoch", []))
