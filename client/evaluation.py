"""Evaluation of one scenario: full-ranking leave-one-out metrics (sequential scenarios) or impression
ranking (impression scenarios such as news), plus intra-list diversity and catalog coverage of the top 10;
and the popularity reference.

Metric keys are ``"{split}.{metric}"`` for split in valid/test: ``hr@10, ndcg@10, mrr`` (full ranking) or
``auc, mrr, ndcg@5, ndcg@10`` (MIND's impression metrics), and ``ild@10, coverage@10`` where item vectors
are given (see :func:`beyond_accuracy`).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shared.config import Config
from shared.data import train_counts
from shared.metrics import impression_values, ranking_values
from shared.model import RecModel

from .ranking import intra_list_diversity
from .training import LocalData, history_tensor

TOP_K = 10
PerUser = dict[str, np.ndarray]  # "test.ndcg@10" -> one value per evaluated user (news: impression)


def eval_sequences(data: LocalData, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(each evaluated user's whole sequence before its target, targets (U,)) for the validation or test
    split of a leave-one-out scenario."""
    s = data.split
    if split == "valid":
        return [s.train[u] for u in s.eval_users], s.valid_target
    if split == "test":
        return [np.append(s.train[u], s.valid_target[i]) for i, u in enumerate(s.eval_users)], s.test_target
    raise ValueError(f"unknown split {split!r}")


def eval_inputs(data: LocalData, split: str, history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(history (U, T), target (U,)) for the validation or test split of a leave-one-out scenario."""
    seqs, targets = eval_sequences(data, split)
    return history_tensor(seqs, history), torch.as_tensor(targets, dtype=torch.long)


def seen_mask(sequences: Sequence[np.ndarray], num_items: int) -> torch.Tensor:
    """(U, N) bool: the items of each sequence (what each user already had: the repeat logit's items)."""
    mask = torch.zeros(len(sequences), num_items, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        mask[row, torch.as_tensor(seq, dtype=torch.long)] = True
    return mask


def impression_inputs(data: LocalData, split: str, history: int) -> tuple[torch.Tensor, list[int]]:
    """(history (M, T), impression positions (M,)) of an impression scenario's validation or test split:
    each impression's history is its user's log before it."""
    log = data.scenario.impressions
    if log is None:
        raise ValueError(f"scenario '{data.scenario.name}' has no impressions")
    positions = {"valid": data.split.valid_impressions, "test": data.split.test_impressions}[split]
    return history_tensor([before(data, m) for m in positions], history), [int(m) for m in positions]


def before(data: LocalData, impression: int) -> np.ndarray:
    """The log of an impression's user before that impression, oldest first."""
    log = data.scenario.impressions
    assert log is not None
    return data.scenario.sequences[log.users[impression]][: log.history_lengths[impression]]


@torch.no_grad()
def score_users(
    model: RecModel,
    history: torch.Tensor,
    table: tuple[torch.Tensor, torch.Tensor],
    sequences: Sequence[np.ndarray] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Ranking-objective scores (U, N) over the whole catalog; ``table`` = (item vectors, biases);
    ``sequences``: each user's whole sequence (the items its repeat logit applies to, :func:`seen_mask`)."""
    model.eval()
    vectors, bias = table
    out = []
    for s in range(0, history.shape[0], batch_size):
        seen = None if sequences is None else seen_mask(sequences[s : s + batch_size], len(vectors))
        out.append(model.scores(model.user_vectors(history[s : s + batch_size], vectors), vectors, bias, seen))
    return torch.cat(out)


def beyond_accuracy(top: torch.Tensor, vectors: torch.Tensor, num_items: int) -> dict[str, float]:
    """ILD@10 (mean over lists of 1 - mean pairwise cosine of the list's item vectors) and coverage@10
    (distinct items in all lists / catalog size) of top-10 lists ``top`` (U, <=10) of item indices."""
    ild = float(np.mean([intra_list_diversity(vectors[row]) for row in top])) if len(top) else 0.0
    return {f"ild@{TOP_K}": ild, f"coverage@{TOP_K}": len(torch.unique(top)) / num_items}


def full_ranking(
    scores: torch.Tensor, target: torch.Tensor, vectors: torch.Tensor | None, per_user: PerUser | None = None
) -> dict[str, float]:
    """Full-ranking metrics of scores (U, N), plus ILD/coverage of the top 10 when item vectors are given;
    each user's values go into ``per_user`` when given."""
    values = ranking_values(scores, target)
    if per_user is not None:
        per_user |= values
    out = {name: float(v.mean()) for name, v in values.items()}
    if vectors is not None:
        top = torch.topk(scores, min(TOP_K, scores.shape[1]), dim=1).indices
        out |= beyond_accuracy(top, vectors, scores.shape[1])
    return out


def impression_ranking(
    data: LocalData,
    positions: list[int],
    scores: list[np.ndarray],
    vectors: torch.Tensor | None,
    per_user: PerUser | None = None,
) -> dict[str, float]:
    """Impression metrics of per-impression candidate scores, plus ILD/coverage of each impression's top 10
    candidates; each impression's values go into ``per_user`` when given. Impressions without both a click
    and a non-click cannot be ranked and are left out."""
    log = data.scenario.impressions
    assert log is not None
    keep = [j for j, m in enumerate(positions) if 0 < log.clicks[m].sum() < len(log.clicks[m])]
    if not keep:
        raise ValueError(f"scenario '{data.scenario.name}': no impression with both a click and a non-click")
    values = impression_values([log.clicks[positions[j]] for j in keep], [scores[j] for j in keep])
    if per_user is not None:
        per_user |= values
    out = {name: float(v.mean()) for name, v in values.items()}
    if vectors is not None:
        tops = [log.candidates[positions[j]][np.argsort(-scores[j], kind="stable")[:TOP_K]] for j in keep]
        out[f"ild@{TOP_K}"] = float(np.mean([intra_list_diversity(vectors[t]) for t in tops]))
        out[f"coverage@{TOP_K}"] = len(np.unique(np.concatenate(tops))) / data.scenario.num_items
    return out


def impression_scores(
    model: RecModel,
    data: LocalData,
    history: torch.Tensor,
    positions: list[int],
    table: tuple[torch.Tensor, torch.Tensor],
) -> list[np.ndarray]:
    """Ranking-objective scores of each impression's candidates; ``table`` = (item vectors, biases)."""
    log = data.scenario.impressions
    assert log is not None
    vectors, bias = table
    users = torch.cat([model.user_vectors(history[s : s + 256], vectors) for s in range(0, len(positions), 256)])
    out = []
    for j, m in enumerate(positions):
        candidates = torch.as_tensor(log.candidates[m])
        seen = torch.from_numpy(np.isin(log.candidates[m], before(data, m)))  # candidates the user had
        out.append(model.scores(users[j], vectors[candidates], bias[candidates], seen).numpy())
    return out


def frozen_table(cfg: Config, texts: list[str]) -> torch.Tensor:
    """Item vectors (N, H) of the frozen encoder for a catalog: the fixed space ILD is measured in."""
    return _frozen_table(cfg.model.encoder, cfg.model.max_length, cfg.lora.layers, tuple(texts), cfg.run.cache_dir)


@functools.lru_cache(maxsize=4)
@torch.no_grad()
def _frozen_table(
    encoder: str, max_length: int, lora_layers: int, texts: tuple[str, ...], cache_dir: str
) -> torch.Tensor:
    """The item table of a model at initialisation (LoRA starts as the identity), cached per catalog."""
    flat = {"model.encoder": encoder, "model.max-length": max_length, "lora.layers": lora_layers}
    model = RecModel(Config.from_run_config({**flat, "run.cache-dir": cache_dir}))
    model.attach_catalog(list(texts))
    return model.text_table()


@torch.no_grad()
def evaluate(
    model: RecModel,
    data: LocalData,
    cfg: Config,
    table: tuple[torch.Tensor, torch.Tensor] | None = None,
    vectors: torch.Tensor | None = None,
    per_user: PerUser | None = None,
) -> dict[str, float]:
    """Validation and test metrics of a model: full ranking over the whole catalog (nothing masked) or,
    for impression scenarios, impression ranking; ILD/coverage of the top 10, ILD in the space of
    ``vectors`` (default: :func:`frozen_table`, the same for every model). ``table``: the model's
    (item vectors, biases) if already computed. ``per_user``: filled with each evaluated user's (news:
    impression's) values, ``"test.ndcg@10"`` -> (U,), in the order of the split (for paired intervals)."""
    model.eval()
    if table is None:
        table = model.item_table()  # once for both splits
    if vectors is None:
        vectors = frozen_table(cfg, data.scenario.texts)
    out: dict[str, float] = {}
    for split in ("valid", "test"):
        values: PerUser = {}
        if data.scenario.impressions is not None:
            history, positions = impression_inputs(data, split, cfg.model.history)
            scores = impression_scores(model, data, history, positions, table)
            metrics = impression_ranking(data, positions, scores, vectors, values)
        else:
            sequences, target = eval_sequences(data, split)
            history = history_tensor(sequences, cfg.model.history)
            ranked = score_users(model, history, table, sequences)
            metrics = full_ranking(ranked, torch.as_tensor(target, dtype=torch.long), vectors, values)
        out |= {f"{split}.{name}": value for name, value in metrics.items()}
        if per_user is not None:
            per_user |= {f"{split}.{name}": v for name, v in values.items()}
    return out


def popularity_metrics(
    data: LocalData, vectors: torch.Tensor | None = None, per_user: PerUser | None = None
) -> dict[str, float]:
    """Popularity reference: items ranked by their count in the training split (impression scenarios: the
    candidates by that count); ILD/coverage of the top 10 in the space of ``vectors`` when given."""
    counts = train_counts(data.split, data.scenario.num_items).astype(np.float32)
    out: dict[str, float] = {}
    for split in ("valid", "test"):
        values: PerUser = {}
        if data.scenario.impressions is not None:
            _, positions = impression_inputs(data, split, 1)
            scores = [counts[data.scenario.impressions.candidates[m]] for m in positions]
            metrics = impression_ranking(data, positions, scores, vectors, values)
        else:
            _, target = eval_inputs(data, split, 1)
            metrics = full_ranking(torch.as_tensor(counts).expand(len(target), -1), target, vectors, values)
        out |= {f"{split}.{name}": value for name, value in metrics.items()}
        if per_user is not None:
            per_user |= {f"{split}.{name}": v for name, v in values.items()}
    return out


def per_user_file(folder: str | Path, scenario: str, server_round: int) -> Path:
    """Where the per-user values of one evaluation live: ``FOLDER/clients/SCENARIO/eval/round-NNNN.npz``
    (FOLDER = a run folder: a federated client's state folder is ``FOLDER/clients/SCENARIO``)."""
    return eval_file(Path(folder) / "clients" / scenario, server_round)


def eval_file(state: Path, server_round: int) -> Path:
    """A client's per-user values of one round's evaluation, in its state folder."""
    return state / "eval" / f"round-{server_round:04d}.npz"


def save_per_user(path: Path, values: PerUser) -> None:
    """Write per-user values (``{"test.ndcg@10": (U,), ...}``) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **values)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_per_user(path: Path) -> PerUser:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}
