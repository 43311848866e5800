"""The one config schema: frozen dataclasses parsed once from Flower's flat run config.

Every key has its default here and the same default in ``pyproject.toml``
(``[tool.flwr.app.config]``); ``tests/test_config.py`` checks that both agree.
Keys are grouped by dotted prefix: ``model.*``, ``lora.*``, ``train.*``, ``fed.*``,
``privacy.*``, ``data.*``, ``run.*``, ``serve.*``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# model keys added after checkpoints were first written, with the value a config had before the key existed:
# left out of the model hash at that value, and filled in with it when a checkpoint's config lacks the key, so
# checkpoints written before a key existed still load as what they were
LATER_KEYS: dict[str, object] = {"model.item-ids": False, "model.text-only": "", "model.repeat-logit": False}
POLICIES = ("greedy", "epsilon-greedy", "ucb", "thompson")  # serve.policy: who fills the exploration slots

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def _fail(key: str, value: object, why: str) -> None:
    raise ValueError(f"config key '{key}' = {value!r}: {why}")


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class ModelConfig:
    """Frozen encoder, item/user towers and multi-objective head."""

    encoder: str = DEFAULT_ENCODER  # packaged MiniLM, a local folder, or a cached model id
    max_length: int = 32  # tokens per item text
    history: int = 20  # most recent items the sequence encoder reads (its positions)
    seq_dim: int = 64  # width of the sequence encoder
    seq_layers: int = 2  # causal self-attention blocks
    seq_heads: int = 2  # attention heads per block
    seq_dropout: float = 0.2  # dropout in the sequence encoder (training only)
    scale: float = 20.0  # initial scale a of the ranking logit a * cos(user, item) (learned; 1 / temperature)
    item_memory: bool = True  # scenario-private per-item residual + output bias, trained locally, never sent
    memory_dropout: float = 0.75  # share of items whose private residual is dropped at each training step
    item_ids: bool = False  # with item-memory: a private ID embedding per item on the sequence encoder's input
    text_only: str = ""  # with item-ids: scenarios whose items get no ID embedding (fresh content, e.g. news)
    # a private learned logit added to the items a user already had (part of the item memory: off without it)
    repeat_logit: bool = True
    text_adaptor: bool = True  # shared linear map of every text vector (identity at start), trained on the full catalog
    head_experts: int = 4  # MMoE experts shared by the non-ranking objectives
    head_hidden: int = 64  # width of the MMoE's projections and experts
    objectives: str = "engagement,satisfaction"  # first one is the ranking objective

    def __post_init__(self) -> None:
        for key in ("max_length", "history", "seq_dim", "seq_layers", "seq_heads", "head_experts", "head_hidden"):
            if getattr(self, key) < 1:
                _fail(f"model.{key.replace('_', '-')}", getattr(self, key), "must be >= 1")
        if self.seq_dim % self.seq_heads:
            _fail("model.seq-dim", self.seq_dim, f"must be a multiple of model.seq-heads ({self.seq_heads})")
        if not (math.isfinite(self.scale) and self.scale > 0):
            _fail("model.scale", self.scale, "must be a finite number > 0")
        for key in ("seq_dropout", "memory_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                _fail(f"model.{key.replace('_', '-')}", getattr(self, key), "must be in [0, 1)")
        if self.item_ids and not self.item_memory:
            _fail("model.item-ids", self.item_ids, "needs model.item-memory (the ID embeddings are part of it)")
        names = _names(self.objectives)
        if not names or len(set(names)) != len(names):
            _fail("model.objectives", self.objectives, "needs distinct comma-separated names")
        if not self.encoder:
            _fail("model.encoder", self.encoder, "must name a model")

    def ids_for(self, scenario: str) -> bool:
        """Whether the items of ``scenario`` get private ID embeddings."""
        return self.item_ids and scenario not in _names(self.text_only)

    @property
    def objective_names(self) -> tuple[str, ...]:
        return _names(self.objectives)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on the attention projections of the top layers."""

    rank: int = 8
    alpha: int = 16
    layers: int = 2  # LoRA on the top N layers; the frozen layers below are cached
    targets: str = "query,value"

    def __post_init__(self) -> None:
        for key in ("rank", "alpha", "layers"):
            if getattr(self, key) < 1:
                _fail(f"lora.{key}", getattr(self, key), "must be >= 1")
        if not _names(self.targets):
            _fail("lora.targets", self.targets, "needs at least one module name")

    @property
    def target_modules(self) -> list[str]:
        return list(_names(self.targets))


@dataclass(frozen=True)
class TrainConfig:
    """Local training on one client (or one scenario alone)."""

    local_steps: int = 25  # optimiser steps per round
    batch_size: int = 128  # users sampled per step, one sequence each (loss at every position)
    fresh_items: int = 1  # per user: items of its sequence encoded fresh through LoRA (the adapters' gradient)
    fresh_every: int = 1  # fresh items on every N-th step only (the others train on the item table: ~6x cheaper)
    table_refresh: int = 0  # steps between refreshes of the item table; 0 = once per round
    negatives: int = 0  # catalog items sampled uniformly per step as the ranking softmax's negatives; 0 = all
    lr: float = 0.001
    lora_lr: float = 0.0001  # learning rate of the LoRA adapters (10x below lr: measured, BENCHMARKS.md)
    memory_lr: float = 0.0001  # learning rate of the private item memory (measured: BENCHMARKS.md)
    repeat_lr: float = 0.05  # learning rate of the private repeat logit (one scalar that must travel far)
    weight_decay: float = 0.0
    aux_weight: float = 0.5  # weight of every non-ranking objective's loss
    seed: int = 0
    threads: int = 0  # torch threads per process; 0 keeps torch's default

    def __post_init__(self) -> None:
        for key in ("local_steps", "batch_size", "fresh_every"):
            if getattr(self, key) < 1:
                _fail(f"train.{key.replace('_', '-')}", getattr(self, key), "must be >= 1")
        for key in ("fresh_items", "table_refresh", "negatives", "threads"):
            if getattr(self, key) < 0:
                _fail(f"train.{key.replace('_', '-')}", getattr(self, key), "must be >= 0")
        for key in ("lr", "lora_lr", "memory_lr", "repeat_lr"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                _fail(f"train.{key.replace('_', '-')}", getattr(self, key), "must be a finite number > 0")
        for key in ("weight_decay", "aux_weight"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                _fail(f"train.{key.replace('_', '-')}", getattr(self, key), "must be a finite number >= 0")
        if self.seed < 0:
            _fail("train.seed", self.seed, "must be >= 0")


PERSONAL_CHOICES = ("user", "head", "adaptor")  # the shared modules a client can keep its own copy of


@dataclass(frozen=True)
class FedConfig:
    """Federation settings: rounds, how replies are weighted, bounded and combined, and which shared
    modules each client also keeps a personal copy of."""

    rounds: int = 3  # validation peaked at rounds 1-3 on the demo and the public benchmark (BENCHMARKS.md)
    min_clients: int = 3  # a round needs this many valid replies
    weighting: str = "examples"  # "examples" (FedAvg, capped by max-share) or "uniform" (one vote per scenario)
    max_share: float = 0.5  # largest share of a round's weight one reply can get (a client reports its own examples)
    aggregation: str = "fedavg"  # "fedavg" (LoRA A and B averaged) or "ffa" (A frozen at a seeded init, B averaged)
    clip: float = 3.0  # each update's L2 norm bounded to clip x the round's median update norm; 0 = off
    outlier: float = 10.0  # a reply whose update norm is above outlier x the others' median is dropped; 0 = off
    robust: str = "mean"  # "mean" (weighted), "trimmed-mean" or "median" (coordinate-wise, unweighted)
    trim: float = 0.2  # share of replies trimmed at each end of every coordinate under "trimmed-mean"
    timeout: float = 3600.0  # seconds to wait for replies in a round
    # comma list of shared modules ("user", "head", "adaptor") each client keeps training from its own copy:
    # still sent and averaged (the global model that serves newcomers), never loaded back by the client.
    # All three: on Amazon's validation averaging them cost -0.006 NDCG@10 against training alone (BENCHMARKS.md)
    personal: str = "user,head,adaptor"

    @property
    def personal_modules(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.personal.split(",") if name.strip())

    def __post_init__(self) -> None:
        unknown = sorted(set(self.personal_modules) - set(PERSONAL_CHOICES))
        if unknown:
            _fail("fed.personal", self.personal, f"names {unknown}; choose from " + ", ".join(PERSONAL_CHOICES))
        if self.rounds < 1:
            _fail("fed.rounds", self.rounds, "must be >= 1")
        if self.min_clients < 1:
            _fail("fed.min-clients", self.min_clients, "must be >= 1")
        choices: dict[str, tuple[str, ...]] = {"weighting": ("examples", "uniform"), "aggregation": ("fedavg", "ffa")}
        choices["robust"] = ("mean", "trimmed-mean", "median")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                _fail(f"fed.{key}", getattr(self, key), "must be one of " + ", ".join(map(repr, allowed)))
        if not (math.isfinite(self.max_share) and 0 < self.max_share <= 1):
            _fail("fed.max-share", self.max_share, "must be in (0, 1]")
        for key in ("clip", "outlier"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                _fail(f"fed.{key}", getattr(self, key), "must be a finite number >= 0 (0 = off)")
        if self.outlier and self.outlier <= 1:
            _fail("fed.outlier", self.outlier, "must be > 1 (a multiple of the median) or 0 (off)")
        if self.clip and self.clip < 1:
            _fail("fed.clip", self.clip, "must be >= 1 (a multiple of the median) or 0 (off)")
        if not 0 <= self.trim < 0.5:
            _fail("fed.trim", self.trim, "must be in [0, 0.5)")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            _fail("fed.timeout", self.timeout, "must be > 0")


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level DP-SGD on every client (Opacus); the budget is per scenario for the whole planned run."""

    epsilon: float = 0.0  # target epsilon for fed.rounds x train.local-steps steps; 0 = no differential privacy
    delta: float = 0.0  # 0 = 1 / (10 x the scenario's number of users)
    max_grad_norm: float = 1.0  # per-user clipping bound
    # true: a client whose ledger is behind the epsilon the server has on record for its scenario trains anyway
    # (a deliberately new budget, logged); false: it refuses (a lost or replaced ledger never resets epsilon)
    new_budget: bool = False

    def __post_init__(self) -> None:
        for key in ("epsilon", "delta"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                _fail(f"privacy.{key}", value, "must be >= 0 (0 = off / automatic)")
        if not self.delta < 1:
            _fail("privacy.delta", self.delta, "must be < 1")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            _fail("privacy.max-grad-norm", self.max_grad_norm, "must be > 0")

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0


@dataclass(frozen=True)
class DataConfig:
    """Where scenarios live (simulation: partition-id -> scenario)."""

    dir: str = ""  # folder holding one sub-folder per scenario in the canonical format
    scenarios: str = "shop,video,news"
    lenient: bool = False  # skip malformed rows (and report them) instead of failing
    shards: int = 1  # simulation: clients per scenario, each with a disjoint share of its users (scale tests)

    def __post_init__(self) -> None:
        names = _names(self.scenarios)
        if not names or len(set(names)) != len(names):
            _fail("data.scenarios", self.scenarios, "needs distinct comma-separated names")
        if self.shards < 1:
            _fail("data.shards", self.shards, "must be >= 1")

    @property
    def scenario_names(self) -> tuple[str, ...]:
        return _names(self.scenarios)


@dataclass(frozen=True)
class RunConfig:
    """Where the server writes, and where it resumes from."""

    dir: str = ""  # run folder: metrics.jsonl, checkpoints/, adapter/
    resume: str = ""  # a checkpoint folder to continue from ("" = start fresh)
    # encodings that do not change during a run (frozen prefix, text tables), computed once and read by every
    # process of the run; "" = kept in memory per process only
    cache_dir: str = ""


@dataclass(frozen=True)
class ServeConfig:
    """Defaults of the recommendation service (a request may override weights and diversity)."""

    weights: str = ""  # objective weights, comma-separated in model.objectives order; "" = ranking objective only
    diversity: float = 0.0  # MMR lambda: 0 = plain top-k by utility, 1 = diversity only
    value_weight: float = 0.0  # weight of the catalog's normalised item value in the utility
    mmr_pool: int = 200  # MMR re-ranks this many top-utility candidates
    max_k: int = 100  # largest k a request may ask for
    ann_min_items: int = 50000  # catalogs this large retrieve candidates from an HNSW index first; 0 = never
    ann_candidates: int = 1000  # candidates the index retrieves (by the ranking objective) for the head to re-rank
    feedback_db: str = ""  # SQLite file of served lists and their outcomes (POST /feedback); "" = no feedback
    policy: str = "greedy"  # who fills the exploration slots: greedy | epsilon-greedy | ucb | thompson
    explore_slots: int = 2  # the last slots of each list that the policy fills (greedy: the model's order)
    explore_pool: int = 50  # candidates (best by utility after the list's other items) the policy chooses from
    epsilon: float = 0.1  # epsilon-greedy: chance that the slots go to random candidates of the pool
    prior_strength: float = 0.5  # weight of the model's expectation in an item's posterior (units of reward)
    ucb_c: float = 1.0  # UCB: width of the bonus
    draws: int = 200  # Thompson sampling: draws that estimate the propensities
    ab_share: float = 0.0  # A/B test: share of users (by a stable hash of the user id) served by arm B
    ab_policy: str = ""  # A/B test: arm B's policy ("" = serve.policy)

    def __post_init__(self) -> None:
        if self.weights:
            try:
                values = [float(w) for w in _names(self.weights)]
            except ValueError:
                values = [-1.0]
            if any(not math.isfinite(w) or w < 0 for w in values) or not sum(values) > 0:
                _fail("serve.weights", self.weights, "needs non-negative numbers with a positive sum")
        if not 0.0 <= self.diversity <= 1.0:
            _fail("serve.diversity", self.diversity, "must be in [0, 1]")
        if not math.isfinite(self.value_weight):
            _fail("serve.value-weight", self.value_weight, "must be finite")
        if self.ann_min_items < 0:
            _fail("serve.ann-min-items", self.ann_min_items, "must be >= 0 (0: always score every item)")
        for key in ("mmr_pool", "max_k", "ann_candidates", "explore_pool", "draws"):
            if getattr(self, key) < 1:
                _fail(f"serve.{key.replace('_', '-')}", getattr(self, key), "must be >= 1")
        for key, policy in (("policy", self.policy), ("ab-policy", self.ab_policy or self.policy)):
            if policy not in POLICIES:
                _fail(f"serve.{key}", policy, f"must be one of {', '.join(POLICIES)}")
        if self.explore_slots < 0:
            _fail("serve.explore-slots", self.explore_slots, "must be >= 0")
        if not 0.0 <= self.epsilon <= 1.0:
            _fail("serve.epsilon", self.epsilon, "must be in [0, 1]")
        if not self.prior_strength > 0:
            _fail("serve.prior-strength", self.prior_strength, "must be > 0")
        if not self.ucb_c >= 0:
            _fail("serve.ucb-c", self.ucb_c, "must be >= 0")
        if not 0.0 <= self.ab_share <= 1.0:
            _fail("serve.ab-share", self.ab_share, "must be in [0, 1]")
        learning = {self.policy, self.ab_policy or self.policy} - {"greedy"}
        if learning and self.value_weight != 0.0:
            _fail("serve.value-weight", self.value_weight, "applies to serve.policy = greedy only")
        if learning and not self.feedback_db:
            _fail("serve.policy", ",".join(sorted(learning)), "learns from feedback: set serve.feedback-db too")

    @property
    def weight_values(self) -> tuple[float, ...]:
        return tuple(float(w) for w in _names(self.weights))


@dataclass(frozen=True)
class Config:
    """The whole configuration of a crossrec run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        for key, value in self.to_flat().items():  # what a section's own checks did not already refuse
            if isinstance(value, float) and not math.isfinite(value):
                _fail(key, value, "must be a finite number")
        if self.model.item_ids and self.privacy.enabled:  # DP-SGD keeps the whole item memory frozen
            _fail("model.item-ids", True, "is for non-private runs: under DP the ID embeddings would stay random")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Config:
        """Parse Flower's flat run config (``"train.lr": 0.003``); unknown keys and bad types raise."""
        groups: dict[str, dict[str, Any]] = {f.name: {} for f in fields(cls)}
        defaults = cls().to_flat()
        for key, value in run_config.items():
            if key not in defaults:
                raise ValueError(f"unknown config key '{key}' (known: {', '.join(sorted(defaults))})")
            expected = type(defaults[key])
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not expected:
                _fail(key, value, f"must be of type {expected.__name__}")
            group, name = key.split(".", 1)
            groups[group][name.replace("-", "_")] = value
        base = cls()
        return cls(**{g: dataclasses.replace(getattr(base, g), **kv) for g, kv in groups.items()})

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """The flat run-config form, the inverse of :meth:`from_run_config`."""
        flat: dict[str, bool | int | float | str] = {}
        for section in fields(self):
            for f in fields(getattr(self, section.name)):
                flat[f"{section.name}.{f.name.replace('_', '-')}"] = getattr(getattr(self, section.name), f.name)
        return flat

    def model_hash(self, hashed_then: tuple[str, ...] = ()) -> str:
        """Hash of everything that fixes the shared weights' names and shapes (``fed.aggregation``: which are sent).
        LATER_KEYS at their earlier values are left out, except those in ``hashed_then`` (the hash of a checkpoint
        written while those keys were hashed at any value: ``("model.item-ids",)`` on 2026-11-29)."""
        keys = {
            k: v
            for k, v in self.to_flat().items()
            if k.startswith(("model.", "lora.")) and (k in hashed_then or not (k in LATER_KEYS and LATER_KEYS[k] == v))
        }
        if self.fed.aggregation != "fedavg":  # fedavg sends every adapter weight (and keeps older hashes)
            keys["fed.aggregation"] = self.fed.aggregation
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
