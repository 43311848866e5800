"""Multi-objective utility and MMR diversity re-ranking: plain tensor functions."""

from __future__ import annotations

import torch


def utility(
    probs: torch.Tensor,
    weights: torch.Tensor,
    values: torch.Tensor | None = None,
    value_weight: float = 0.0,
    bounds: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Weighted sum of objective probabilities (N, K) @ (K,) with weights normalised to sum 1,
    plus ``value_weight`` x the item value min-max scaled to [0, 1] (unknown values count 0) by ``bounds``
    (the whole catalog's known min and max when ``values`` are candidates of it; default: those of ``values``)."""
    total = float(weights.sum())
    if not total > 0 or bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError(
            f"objective weights must be finite, non-negative and sum to a positive number, got {weights.tolist()}"
        )
    out = probs @ (weights / total)  # (N,)
    if values is not None and value_weight != 0.0:
        known = torch.isfinite(values)
        if bool(known.any()):
            low, high = bounds if bounds is not None else (float(values[known].min()), float(values[known].max()))
            scaled = (values - low) / (high - low) if float(high - low) > 0 else torch.ones_like(values)
            out = out + value_weight * torch.where(known, scaled, torch.zeros_like(values))
    return out


def mmr(utility: torch.Tensor, vectors: torch.Tensor, k: int, diversity: float, pool: int) -> list[int]:
    """Maximal marginal relevance over the ``pool`` best items: repeatedly pick
    argmax (1 - diversity) * utility - diversity * max cosine to the items already picked.

    ``diversity = 0`` is the exact top-k by utility. Items with utility -inf are never returned.
    """
    available = int(torch.isfinite(utility).sum())
    k = min(k, available)
    if k <= 0:
        return []
    if diversity == 0.0:
        return torch.topk(utility, k).indices.tolist()
    candidates = torch.topk(utility, min(available, max(k, pool))).indices  # (C,) best first
    u = utility[candidates]
    sims = vectors[candidates] @ vectors[candidates].T  # (C, C)
    penalty = torch.zeros(len(candidates))  # max similarity to the picked items (none picked: 0)
    taken = torch.zeros(len(candidates), dtype=torch.bool)
    picked: list[int] = []
    for _ in range(k):
        score = ((1.0 - diversity) * u - diversity * penalty).masked_fill(taken, -torch.inf)
        best = int(torch.argmax(score))  # ties: the higher-utility candidate (candidates are sorted)
        penalty = sims[best].clone() if not picked else torch.maximum(penalty, sims[best])
        picked.append(best)
        taken[best] = True
    return candidates[picked].tolist()


def intra_list_diversity(vectors: torch.Tensor) -> float:
    """1 - mean pairwise cosine similarity of a list's (unit) item vectors."""
    n = vectors.shape[0]
    if n < 2:
        return 0.0
    sims = vectors @ vectors.T
    return float(1.0 - (sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))
