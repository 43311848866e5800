"""Full-ranking metrics with ties counted in expectation (random tie-breaking).

For one user, let ``g`` be the number of items scored strictly above the target and ``e`` the
number of *other* items scored exactly like it. Under random tie-breaking the target's 0-based
rank is uniform on ``g .. g+e``; every metric here is its exact expectation over that rank, so a
tie never counts in the target's favour.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

METRIC_NAMES = ("hr@10", "ndcg@10", "mrr")


def tie_counts(scores: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(g, e) per row of ``scores`` (U, N) for target item indices ``targets`` (U,)."""
    target_scores = scores.gather(1, targets[:, None])  # (U, 1)
    greater = (scores > target_scores).sum(1)
    equal = (scores == target_scores).sum(1) - 1
    return greater.cpu().numpy().astype(np.int64), equal.cpu().numpy().astype(np.int64)


def expected_metrics(greater: np.ndarray, equal: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Per-user expected HR@k, NDCG@k and MRR given tie counts ``g`` and ``e``."""
    greater = np.asarray(greater, dtype=np.int64)
    equal = np.asarray(equal, dtype=np.int64)
    if greater.shape != equal.shape or (greater < 0).any() or (equal < 0).any():
        raise ValueError("greater and equal must be non-negative arrays of one shape")
    n = equal + 1  # positions the target may take
    last = greater + equal  # last possible 0-based rank
    # positions below k: g .. min(last, k-1)
    hits = np.clip(np.minimum(last, k - 1) - greater + 1, 0, None)
    discount = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])  # prefix sums
    top = np.minimum(last, k - 1) + 1
    dcg = np.where(hits > 0, discount[np.clip(top, 0, k)] - discount[np.clip(greater, 0, k)], 0.0)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(last.max(initial=0)) + 2))])
    rr = harmonic[last + 1] - harmonic[greater]  # sum over ranks r of 1/(r+1)
    return {f"hr@{k}": hits / n, f"ndcg@{k}": dcg / n, "mrr": rr / n}


def ranking_metrics(scores: torch.Tensor, targets: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Mean expected HR@k, NDCG@k and MRR over users; scores (U, N) over the full catalog."""
    return {name: float(v.mean()) for name, v in ranking_values(scores, targets, k).items()}


def ranking_values(scores: torch.Tensor, targets: torch.Tensor, k: int = 10) -> dict[str, np.ndarray]:
    """Per-user expected HR@k, NDCG@k and MRR (U,) each; scores (U, N) over the full catalog."""
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(
            f"scores must be (U, N) and targets (U,), got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("no users to evaluate")
    g, e = tie_counts(scores, targets)
    return expected_metrics(g, e, k)


def mask_seen(scores: torch.Tensor, seen: list[np.ndarray], targets: torch.Tensor) -> torch.Tensor:
    """The history-masked variant (it can only flatter): a copy of scores (U, N) with each user's ``seen``
    items set to -inf, except the user's target itself (a repeat is still ranked)."""
    if len(seen) != scores.shape[0] or targets.shape != (scores.shape[0],):
        raise ValueError("seen and targets need one entry per row of scores")
    out = scores.clone()
    for row, items in enumerate(seen):
        items = np.asarray(items, dtype=np.int64)
        out[row, torch.from_numpy(items[items != int(targets[row])])] = -torch.inf
    return out


IMPRESSION_METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10")


def _expected_discounts(scores: np.ndarray, discount: np.ndarray) -> np.ndarray:
    """Per item, the mean of ``discount[rank]`` over the ranks its tie block may take (0-based ranks)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    out = np.empty(len(scores))
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        out[order[start : end + 1]] = discount[start : end + 1].mean()
        start = end + 1
    return out


def impression_metrics(labels: list[np.ndarray], scores: list[np.ndarray]) -> dict[str, float]:
    """MIND's impression metrics (AUC, MRR, nDCG@5, nDCG@10), averaged over impressions, ties in expectation."""
    return {m: float(v.mean()) for m, v in impression_values(labels, scores).items()}


def impression_values(labels: list[np.ndarray], scores: list[np.ndarray]) -> dict[str, np.ndarray]:
    """MIND's impression metrics (AUC, MRR, nDCG@5, nDCG@10) per impression, ties in expectation.

    Per impression: AUC = P(clicked scored above non-clicked) with ties counting 1/2; MRR = sum of
    clicked items' 1/rank over the number of clicks; nDCG@k with gains 2^label - 1.
    """
    out: dict[str, list[float]] = {m: [] for m in IMPRESSION_METRICS}
    for y, s in zip(labels, scores, strict=True):
        y, s = np.asarray(y, dtype=np.float64), np.asarray(s, dtype=np.float64)
        pos, neg = s[y > 0], s[y == 0]
        if len(pos) == 0 or len(neg) == 0:
            raise ValueError("every impression needs at least one clicked and one non-clicked candidate")
        greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        out["auc"].append(float(greater / (len(pos) * len(neg))))
        n = len(s)
        out["mrr"].append(float((y * _expected_discounts(s, 1.0 / np.arange(1, n + 1))).sum() / y.sum()))
        gains = 2.0**y - 1.0
        for k in (5, 10):
            discount = np.where(np.arange(n) < k, 1.0 / np.log2(np.arange(n) + 2.0), 0.0)
            ideal = (np.sort(gains)[::-1] * discount).sum()
            out[f"ndcg@{k}"].append(float((gains * _expected_discounts(s, discount)).sum() / ideal))
    return {m: np.asarray(v) for m, v in out.items()}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of the paired differences ``a - b`` (the same users or impressions, in the same order) with a
    percentile bootstrap interval over users: ``{"diff", "lo", "hi", "n"}``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired values need two non-empty 1-d arrays of one shape, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(len(diff), size=len(diff))].mean() for _ in range(resamples)])
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(diff.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(diff))}


Row = dict[str, Any]  # one metrics.jsonl row: round, scenario, reference, train, valid, test


def primary_metric(row: Row) -> str:
    """The metric a row is selected on: AUC for impression scenarios (news), NDCG@10 otherwise."""
    return "auc" if "auc" in row["valid"] else "ndcg@10"


GLOBAL_MODELS = ("federated", "centralized")  # one model for every scenario: one round for all


def select_rounds(rows: list[Row]) -> dict[str, Row]:
    """Per scenario, the row of the round with the best *validation* primary metric (:func:`primary_metric`;
    earliest round on ties).

    Rows of one global model (federated, centralized) share one round, chosen on the mean over scenarios of
    each scenario's validation primary metric relative to its best round (scale-free, so AUC ~0.6 and
    NDCG@10 ~0.05 weigh alike); local rows are separate models, chosen per scenario.
    """
    chosen: dict[str, Row] = {}
    by_round: dict[int, list[Row]] = {}
    for row in rows:
        by_round.setdefault(int(row["round"]), []).append(row)
    if rows and rows[0]["reference"].split("-")[0] in GLOBAL_MODELS:
        best: dict[str, float] = {}
        for row in rows:
            value = float(row["valid"][primary_metric(row)])
            best[row["scenario"]] = max(best.get(row["scenario"], value), value)

        def score(r: int) -> float:
            return float(
                np.mean(
                    [
                        x["valid"][primary_metric(x)] / best[x["scenario"]] if best[x["scenario"]] else 0.0
                        for x in by_round[r]
                    ]
                )
            )

        chosen_round = max(sorted(by_round), key=score)
        return {str(x["scenario"]): x for x in by_round[chosen_round]}
    for row in sorted(rows, key=lambda x: int(x["round"])):
        name = str(row["scenario"])
        if name not in chosen or row["valid"][primary_metric(row)] > chosen[name]["valid"][primary_metric(row)]:
            chosen[name] = row
    return chosen
