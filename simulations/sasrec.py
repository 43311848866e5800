"""``sasrec``: a textbook ID-based SASRec reference, trained and evaluated on the same leave-one-out split as
the federation.

SASRec (Kang & McAuley, 2018) as RecBole runs it: each item is a learned ID embedding (no text), a learned
positional embedding is added, ``layers`` causal self-attention blocks (:class:`shared.model.CausalBlock`,
pre-norm) and a final LayerNorm read the user's sequence, and the next item's logits are the hidden state
times the item embeddings (tied). Training is the full-softmax cross-entropy of the next item over the
whole catalog at every position of each user's most recent ``max_length`` + 1 training items (an epoch =
every trainable user once, shuffled). Evaluation is crossrec's: the whole catalog scored for each
evaluation user from its last ``max_length`` items (nothing masked), metrics by
:func:`client.evaluation.full_ranking`, ILD in the frozen encoder's item space
(:func:`client.evaluation.frozen_table`) like every other reference.

It is for sequential (leave-one-out) scenarios only: an impression scenario (news) has cold items an ID
embedding has never seen and evaluation users with no training sequence, which an ID model cannot score.

Early stopping on validation NDCG@10 (every ``eval_every`` epochs, ``patience`` evaluations without a new
best), within ``max_epochs`` and a wall budget ``max_seconds``. Every evaluation is one row; the
benchmark's round selection picks the best one on validation, so the test metrics are never looked at to
choose anything.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from client.evaluation import PerUser, eval_sequences, frozen_table, full_ranking, seen_mask
from client.training import LocalData, history_tensor
from shared.config import Config
from shared.metrics import ranking_values
from shared.model import CausalBlock
from simulations.references import Row, evaluated

log = logging.getLogger(__name__)

REFERENCE = "sasrec"
EVAL_BATCH = 1024  # evaluation users scored at once
MICRO_BATCH = 32  # users per forward pass in training (gradients accumulated over the batch)


@dataclass(frozen=True)
class SASRecSettings:
    """Hyperparameters of the SASRec reference (RecBole's SASRec defaults unless noted).

    Chosen on validation NDCG@10 only. Amazon Scientific (8,442 users, 33 steps an epoch): dropout 0.5
    0.0596, 0.3 0.0599 (a tie; 0.5 kept, RecBole's default, flatter after its peak). MovieLens
    ml-latest-small (610 users: 3 steps an epoch at 256 users) is step-limited within ``max_seconds``:
    ``batch_size=32, dropout=0.2`` reached 0.0217 (still rising at the budget) against 0.0130 for the
    defaults, 0.0137 for batch 32 at dropout 0.5, and ``max_length=200`` (2.5x the cost of an epoch) was no
    better than 50 at equal epochs; so pass ``SASRecSettings(batch_size=32, dropout=0.2)`` there."""

    max_length: int = 50  # most recent items read (and positions learned)
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.5  # embedding, attention and residual dropout (training only)
    lr: float = 1e-3  # Adam
    batch_size: int = 256  # users per step
    max_epochs: int = 200
    eval_every: int = 2  # epochs between evaluations (one evaluation of both splits costs about half an epoch)
    patience: int = 5  # evaluations without a new best validation NDCG@10 before stopping
    max_seconds: float = 600.0  # wall budget of training + evaluation; stops after the epoch that exceeds it

    def __post_init__(self) -> None:
        for key in ("max_length", "hidden", "layers", "heads", "batch_size", "max_epochs", "eval_every", "patience"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SASRecSettings.{key} = {value!r}: must be an integer >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"SASRecSettings.hidden = {self.hidden}: must be a multiple of heads ({self.heads})")
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"SASRecSettings.dropout = {self.dropout!r}: must be in [0, 1)")
        for key in ("lr", "max_seconds"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"SASRecSettings.{key} = {value!r}: must be a finite number > 0")


class SASRec(nn.Module):
    """Item ID embedding (index 0 = padding, item i at i + 1) + learned positions, causal blocks, final
    LayerNorm; logits tied to the item embedding."""

    def __init__(self, num_items: int, settings: SASRecSettings) -> None:
        super().__init__()
        self.length = settings.max_length
        self.items = nn.Embedding(num_items + 1, settings.hidden, padding_idx=0)
        self.position = nn.Embedding(settings.max_length, settings.hidden)
        self.drop = nn.Dropout(settings.dropout)
        self.blocks = nn.ModuleList(
            CausalBlock(settings.hidden, settings.heads, settings.dropout) for _ in range(settings.layers)
        )
        self.norm = nn.LayerNorm(settings.hidden)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        """RecBole's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T) item indices, oldest first, left-padded with -1 (T <= max_length; the last column is
        the most recent item, position max_length - 1) -> hidden states (B, T, W); the state at t depends on
        items <= t only."""
        b, t = seq.shape
        if t > self.length:
            raise ValueError(f"sequence of {t} items; this model reads at most {self.length}")
        mask = seq >= 0
        positions = torch.arange(self.length - t, self.length, device=seq.device).expand(b, t)
        x = self.drop(self.items(seq + 1) + self.position(positions)) * mask[..., None]
        causal = torch.ones(t, t, dtype=torch.bool, device=seq.device).tril()
        # a padded query attends to itself only (an all-masked softmax row would be NaN)
        allowed = causal & (mask[:, None, :] | torch.eye(t, dtype=torch.bool, device=seq.device))  # (B, T, T)
        for block in self.blocks:
            x = block(x, allowed[:, None])
        return self.norm(x)  # type: ignore[no-any-return]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., W) -> next-item logits (..., N) over the catalog (the padding row left out)."""
        return hidden @ self.items.weight[1:].T


def trim(seq: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that are padding in every row (outputs unchanged: padding is masked)."""
    real = (seq >= 0).any(0).nonzero()
    return seq[:, int(real[0]) :] if len(real) else seq[:, -1:]


def train_epoch(
    model: SASRec, optimizer: torch.optim.Optimizer, windows: torch.Tensor, batch_size: int, rng: np.random.Generator
) -> float:
    """One pass over ``windows`` (U, max_length + 1) in shuffled batches of ``batch_size`` users, one Adam
    step each: the full-catalog softmax cross-entropy of the next item at every real position, averaged over
    the batch's positions. Returns the mean loss over positions.

    Each batch runs as micro-batches of users of similar length (fewer padding columns to compute; most
    sequences are much shorter than the longest of a random batch) whose gradients add up to the batch's:
    the same loss and step as one pass over the batch."""
    model.train()
    total, count = 0.0, 0
    order = torch.from_numpy(rng.permutation(len(windows)))
    for start in range(0, len(windows), batch_size):
        batch = windows[order[start : start + batch_size]]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        positions = int(((inputs >= 0) & (targets >= 0)).sum())
        if not positions:
            continue
        optimizer.zero_grad(set_to_none=True)
        by_length = torch.argsort((batch >= 0).sum(1), stable=True)
        summed = 0.0
        for part in by_length.split(MICRO_BATCH):
            micro = trim(batch[part])
            inputs, targets = micro[:, :-1], micro[:, 1:]
            valid = (inputs >= 0) & (targets >= 0)
            if not valid.any():
                continue
            hidden = model(inputs)[valid]  # (P, W): only the positions with a next item
            loss = F.cross_entropy(model.logits(hidden), targets[valid], reduction="sum") / positions
            loss.backward()
            summed += float(loss.detach())
        optimizer.step()
        total, count = total + summed * positions, count + positions
    model.eval()
    return total / max(count, 1)


@torch.no_grad()
def score(model: SASRec, history: torch.Tensor) -> torch.Tensor:
    """Scores (U, N) of the whole catalog for histories (U, T) (oldest first, left-padded with -1); users
    are run in chunks of similar history length (less padding), the rows returned in the input order."""
    model.eval()
    order = torch.argsort((history >= 0).sum(1), stable=True)
    out = torch.empty(history.shape[0], model.items.num_embeddings - 1)
    for s in range(0, len(order), EVAL_BATCH):
        rows = order[s : s + EVAL_BATCH]
        out[rows] = model.logits(model(trim(history[rows]))[:, -1])
    return out


def measure(model: SASRec, data: LocalData, vectors: torch.Tensor, per_user: PerUser) -> dict[str, float]:
    """Validation and test metrics (``"valid.ndcg@10"``, ...), full ranking over the whole catalog (nothing
    masked), and beside them the same with each user's own items masked (``"valid.masked-ndcg@10"``, ...:
    SASRec told that nobody repeats, the bound of giving it a repeat logit like crossrec's); ``per_user``
    gets each evaluation user's values."""
    out: dict[str, float] = {}
    for split in ("valid", "test"):
        sequences, targets = eval_sequences(data, split)
        target = torch.as_tensor(targets, dtype=torch.long)
        values: PerUser = {}
        scores = score(model, history_tensor(sequences, model.length))
        metrics = full_ranking(scores, target, vectors, values)
        seen = seen_mask(sequences, scores.shape[1])
        masked = {f"masked-{k}": v for k, v in ranking_values(scores.masked_fill(seen, -torch.inf), target).items()}
        values |= masked
        metrics |= {k: float(v.mean()) for k, v in masked.items()}
        out |= {f"{split}.{name}": value for name, value in metrics.items()}
        per_user |= {f"{split}.{name}": v for name, v in values.items()}
    return out


def sasrec_rows(
    cfg: Config,
    data: LocalData,
    on_row: Callable[[Row], None] | None = None,
    folder: Path | None = None,
    settings: SASRecSettings = SASRecSettings(),
) -> list[Row]:
    """Train SASRec on one sequential scenario's training split; one row per evaluation (``round`` = epochs
    trained; ``train``: the last epoch's mean loss over positions, epochs, and wall seconds since training
    began, evaluations included, the frozen item vectors for ILD not), each passed to ``on_row`` as it is
    made. Per-user values go under ``folder`` when given (:func:`simulations.references.evaluated`)."""
    if data.scenario.impressions is not None:
        raise ValueError(
            f"scenario '{data.scenario.name}' is an impression scenario: SASRec is for sequential (leave-one-out) "
            "scenarios only (impression scenarios such as news have cold items and evaluation users without a "
            "training sequence, which an ID model cannot score)"
        )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    model = SASRec(data.scenario.num_items, settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    windows = history_tensor([data.split.train[u] for u in data.trainable_users], settings.max_length + 1)
    vectors = frozen_table(cfg, data.scenario.texts)
    started = time.perf_counter()
    rows: list[Row] = []
    best, since_best, loss = -1.0, 0, float("nan")
    epochs = tqdm(range(1, settings.max_epochs + 1), desc=f"sasrec {data.scenario.name}", unit="epoch", disable=None)
    for epoch in epochs:
        loss = train_epoch(model, optimizer, windows, settings.batch_size, rng)
        out_of_time = time.perf_counter() - started > settings.max_seconds
        if epoch % settings.eval_every and epoch < settings.max_epochs and not out_of_time:
            continue
        split = evaluated(folder, data, epoch, functools.partial(measure, model, data, vectors))
        seconds = time.perf_counter() - started
        row: Row = {
            "round": epoch,
            "scenario": data.scenario.name,
            "reference": REFERENCE,
            "train": {"loss": loss, "epochs": epoch, "seconds": seconds},
            **split,
        }
        rows.append(row)
        if on_row:
            on_row(row)
        ndcg = float(split["valid"]["ndcg@10"])
        name = data.scenario.name
        log.info("sasrec %s epoch %d: loss %.4f, valid ndcg@10 %.4f (%.0f s)", name, epoch, loss, ndcg, seconds)
        best, since_best = (ndcg, 0) if ndcg > best else (best, since_best + 1)
        if since_best >= settings.patience:
            log.info("sasrec %s: stopped at epoch %d, %d evaluations without a new best", name, epoch, since_best)
            break
        if out_of_time or time.perf_counter() - started > settings.max_seconds:
            log.info("sasrec %s: stopped at epoch %d, past the %.0f s budget", name, epoch, settings.max_seconds)
            break
    return rows
