"""Evaluation of one scenario: full-ranking leave-one-out metrics (sequential scenarios) or impression
ranking (impression scenarios such as news), plus intra-list diversity and catalog coverage of the top 10;
and the popularity reference.

Metric keys are ``"{split}.{metric}"`` for split in valid/test: ``hr@10, ndcg@10, mrr`` (full ranking) or
``auc, mrr, ndcg@5, ndcg@10`` (MIND's impression metrics), and ``ild@10, coverage@10`` where item vectors
are given (see :func:`beyond_accuracy`).
"""

from __future__ import annotations

import functools
from typing import cast

import numpy as np
import torch
from torch import nn

from shared.config import Config
from shared.metrics import impression_metrics, ranking_metrics
from shared.model import MultiObjectiveHead, RecModel

from .ranking import intra_list_diversity
from .training import LocalData, history_tensor

TOP_K = 10


def eval_inputs(data: LocalData, split: str, history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(history (U, T), target (U,)) for the validation or test split of a leave-one-out scenario."""
    s = data.split
    if split == "valid":
        seqs, targets = [s.train[u] for u in s.eval_users], s.valid_target
    elif split == "test":
        seqs = [np.append(s.train[u], s.valid_target[i]) for i, u in enumerate(s.eval_users)]
        targets = s.test_target
    else:
        raise ValueError(f"unknown split {split!r}")
    return history_tensor(seqs, history), torch.as_tensor(targets, dtype=torch.long)


def impression_inputs(data: LocalData, split: str, history: int) -> tuple[torch.Tensor, list[int]]:
    """(history (M, T), impression positions (M,)) of an impression scenario's validation or test split:
    each impression's history is its user's log before it."""
    log = data.scenario.impressions
    if log is None:
        raise ValueError(f"scenario '{data.scenario.name}' has no impressions")
    positions = {"valid": data.split.valid_impressions, "test": data.split.test_impressions}[split]
    seqs = [data.scenario.sequences[log.users[m]][: log.history_lengths[m]] for m in positions]
    return history_tensor(seqs, history), [int(m) for m in positions]


@torch.no_grad()
def ranking_scores(head: MultiObjectiveHead, users: torch.Tensor, items: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Ranking-objective logits (B, N) of users (B, H) against items (N, H): the same numbers as
    ``head(users, items)[..., 0]``, computed like :meth:`MultiObjectiveHead.fast_scores` for a batch.

    The item parts of the expert and gate layers are computed once (:meth:`item_features`); per user the
    pu*pv and pu parts become one (h+1)-wide matrix applied to [pv, 1], so a block of items costs one
    GEMM for all users; only the ranking objective's gates and tower are used, and the tower is applied
    to each expert before mixing.
    """
    h, e, b_users = head.hidden, head.num_experts, users.shape[0]
    pv1, item_experts, item_gates = head.item_features(items)  # (N, h+1), (N, E*h), (N, K*E)
    item_gates = item_gates[:, :e]  # the ranking objective's gates
    pu = head.user_proj(users)  # (B, h)
    we, wg = head.experts.weight, head.gates.weight[:e]
    user_experts = torch.cat([pu[:, :, None] * we[:, :h].T[None], (pu @ we[:, h : 2 * h].T)[:, None]], 1)
    user_gates = torch.cat([pu[:, :, None] * wg[:, :h].T[None], (pu @ wg[:, h : 2 * h].T)[:, None]], 1)
    user_experts = user_experts.permute(1, 0, 2).reshape(h + 1, b_users * e * h)  # (h+1, B*E*h)
    user_gates = user_gates.permute(1, 0, 2).reshape(h + 1, b_users * e)  # (h+1, B*E)
    tower = cast(nn.Linear, head.towers[0])
    out = torch.empty(items.shape[0], b_users)
    for s in range(0, items.shape[0], block):
        b = slice(s, s + block)
        experts = (pv1[b] @ user_experts).view(-1, b_users, e * h).add_(item_experts[b, None]).relu_()  # (n, B, E*h)
        per_expert = experts.view(-1, b_users, e, h) @ tower.weight[0]  # (n, B, E)
        gates = (pv1[b] @ user_gates).view(-1, b_users, e).add_(item_gates[b, None]).softmax(-1)  # (n, B, E)
        out[b] = (gates * per_expert).sum(-1)
    cosine = head.similarity((users @ items.T)[..., None])[..., 0]  # (B, N)
    return out.T + tower.bias[0] + cosine


@torch.no_grad()
def score_users(
    model: RecModel, history: torch.Tensor, table: torch.Tensor, batch_size: int = 64, fast: bool = True
) -> torch.Tensor:
    """Ranking-objective scores (U, N) over the whole catalog: by :func:`ranking_scores`, or with
    ``fast=False`` through the head's training path (slow; the reference the fast path is tested against)."""
    model.eval()
    rows = []
    for start in range(0, history.shape[0], batch_size):
        users = model.user_vectors(history[start : start + batch_size], table)
        rows.append(ranking_scores(model.head, users, table) if fast else model(users, table)[..., 0])
    return torch.cat(rows)


def beyond_accuracy(top: torch.Tensor, vectors: torch.Tensor, num_items: int) -> dict[str, float]:
    """ILD@10 (mean over lists of 1 - mean pairwise cosine of the list's item vectors) and coverage@10
    (distinct items in all lists / catalog size) of top-10 lists ``top`` (U, <=10) of item indices."""
    ild = float(np.mean([intra_list_diversity(vectors[row]) for row in top])) if len(top) else 0.0
    return {f"ild@{TOP_K}": ild, f"coverage@{TOP_K}": len(torch.unique(top)) / num_items}


def full_ranking(scores: torch.Tensor, target: torch.Tensor, vectors: torch.Tensor | None) -> dict[str, float]:
    """Full-ranking metrics of scores (U, N), plus ILD/coverage of the top 10 when item vectors are given."""
    out = ranking_metrics(scores, target)
    if vectors is not None:
        top = torch.topk(scores, min(TOP_K, scores.shape[1]), dim=1).indices
        out |= beyond_accuracy(top, vectors, scores.shape[1])
    return out


def impression_ranking(
    data: LocalData, positions: list[int], scores: list[np.ndarray], vectors: torch.Tensor | None
) -> dict[str, float]:
    """Impression metrics of per-impression candidate scores, plus ILD/coverage of each impression's top 10
    candidates. Impressions without both a click and a non-click cannot be ranked and are left out."""
    log = data.scenario.impressions
    assert log is not None
    keep = [j for j, m in enumerate(positions) if 0 < log.clicks[m].sum() < len(log.clicks[m])]
    if not keep:
        raise ValueError(f"scenario '{data.scenario.name}': no impression with both a click and a non-click")
    out = impression_metrics([log.clicks[positions[j]] for j in keep], [scores[j] for j in keep])
    if vectors is not None:
        tops = [log.candidates[positions[j]][np.argsort(-scores[j], kind="stable")[:TOP_K]] for j in keep]
        out[f"ild@{TOP_K}"] = float(np.mean([intra_list_diversity(vectors[t]) for t in tops]))
        out[f"coverage@{TOP_K}"] = len(np.unique(np.concatenate(tops))) / data.scenario.num_items
    return out


def impression_scores(
    model: RecModel, data: LocalData, history: torch.Tensor, positions: list[int], table: torch.Tensor
) -> list[np.ndarray]:
    """Ranking-objective scores of each impression's candidates."""
    log = data.scenario.impressions
    assert log is not None
    users = torch.cat([model.user_vectors(history[s : s + 256], table) for s in range(0, len(positions), 256)])
    return [
        model(users[j : j + 1], table[torch.as_tensor(log.candidates[m])])[0, :, 0].numpy()
        for j, m in enumerate(positions)
    ]


def frozen_table(cfg: Config, texts: list[str]) -> torch.Tensor:
    """Item vectors (N, H) of the frozen encoder for a catalog: the fixed space ILD is measured in."""
    return _frozen_table(cfg.model.encoder, cfg.model.max_length, cfg.lora.layers, tuple(texts))


@functools.lru_cache(maxsize=4)
@torch.no_grad()
def _frozen_table(encoder: str, max_length: int, lora_layers: int, texts: tuple[str, ...]) -> torch.Tensor:
    """The item table of a model at initialisation (LoRA starts as the identity), cached per catalog."""
    cfg = Config.from_run_config({"model.encoder": encoder, "model.max-length": max_length, "lora.layers": lora_layers})
    model = RecModel(cfg)
    model.attach_catalog(list(texts))
    return model.item_table()


@torch.no_grad()
def evaluate(
    model: RecModel,
    data: LocalData,
    cfg: Config,
    table: torch.Tensor | None = None,
    vectors: torch.Tensor | None = None,
) -> dict[str, float]:
    """Validation and test metrics of a model: full ranking over the whole catalog (nothing masked) or,
    for impression scenarios, impression ranking; ILD/coverage of the top 10, ILD in the space of
    ``vectors`` (default: :func:`frozen_table`, the same for every model). ``table``: the model's item
    table if already computed."""
    model.eval()
    if table is None:
        table = model.item_table()  # once for both splits
    if vectors is None:
        vectors = frozen_table(cfg, data.scenario.texts)
    out: dict[str, float] = {}
    for split in ("valid", "test"):
        if data.scenario.impressions is not None:
            history, positions = impression_inputs(data, split, cfg.model.history)
            metrics = impression_ranking(
                data, positions, impression_scores(model, data, history, positions, table), vectors
            )
        else:
            history, target = eval_inputs(data, split, cfg.model.history)
            metrics = full_ranking(score_users(model, history, table), target, vectors)
        out |= {f"{split}.{name}": value for name, value in metrics.items()}
    return out


def popularity_metrics(data: LocalData, vectors: torch.Tensor | None = None) -> dict[str, float]:
    """Popularity reference: items ranked by their count in the training split (impression scenarios: the
    candidates by that count); ILD/coverage of the top 10 in the space of ``vectors`` when given."""
    counts = np.bincount(np.concatenate(data.split.train), minlength=data.scenario.num_items).astype(np.float32)
    out: dict[str, float] = {}
    for split in ("valid", "test"):
        if data.scenario.impressions is not None:
            _, positions = impression_inputs(data, split, 1)
            scores = [counts[data.scenario.impressions.candidates[m]] for m in positions]
            metrics = impression_ranking(data, positions, scores, vectors)
        else:
            _, target = eval_inputs(data, split, 1)
            metrics = full_ranking(torch.as_tensor(counts).expand(len(target), -1), target, vectors)
        out |= {f"{split}.{name}": value for name, value in metrics.items()}
    return out
