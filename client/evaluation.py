"""Evaluation of one scenario: full-ranking leave-one-out metrics and the popularity reference."""

from __future__ import annotations

import numpy as np
import torch

from shared.config import Config
from shared.metrics import ranking_metrics
from shared.model import RecModel

from .training import LocalData, history_tensor


def eval_inputs(data: LocalData, split: str, history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(history (U, T), target (U,)) for the validation or test split."""
    s = data.split
    if split == "valid":
        seqs, targets = [s.train[u] for u in s.eval_users], s.valid_target
    elif split == "test":
        seqs = [np.append(s.train[u], s.valid_target[i]) for i, u in enumerate(s.eval_users)]
        targets = s.test_target
    else:
        raise ValueError(f"unknown split {split!r}")
    return history_tensor(seqs, history), torch.as_tensor(targets, dtype=torch.long)


@torch.no_grad()
def score_users(model: RecModel, history: torch.Tensor, table: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Ranking-objective scores (U, N) over the whole catalog, given its item table (N, H)."""
    model.eval()
    rows = []
    for start in range(0, history.shape[0], batch_size):
        users = model.user_vectors(history[start : start + batch_size], table)
        rows.append(model(users, table)[..., 0])
    return torch.cat(rows)


def evaluate(model: RecModel, data: LocalData, cfg: Config) -> dict[str, float]:
    """Full-ranking HR@10, NDCG@10 and MRR on validation and test (nothing masked)."""
    model.eval()
    table = model.item_table()  # once for both splits
    out = {}
    for split in ("valid", "test"):
        history, target = eval_inputs(data, split, cfg.model.history)
        for name, value in ranking_metrics(score_users(model, history, table), target).items():
            out[f"{split}.{name}"] = value
    return out


def popularity_metrics(data: LocalData) -> dict[str, float]:
    """Popularity reference: items ranked by their count in the training split."""
    counts = np.bincount(np.concatenate(data.split.train), minlength=data.scenario.num_items)
    out = {}
    for split in ("valid", "test"):
        history, target = eval_inputs(data, split, 1)
        scores = torch.as_tensor(counts, dtype=torch.float32).expand(len(target), -1)
        for name, value in ranking_metrics(scores, target).items():
            out[f"{split}.{name}"] = value
    return out
