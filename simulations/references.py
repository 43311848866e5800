"""Reference points trained or scored in-process on the same splits as the federation.

- ``popularity``: items ranked by their count in the training split;
- ``zero_shot``: the model at initialisation (frozen encoder, user = mean of the history vectors, cosine);
- ``local``: each scenario alone, same model, initial weights, rounds and steps as a federated client;
- ``centralized``: every scenario's training data pooled in one process (batches drawn from all users; each
  position's softmax over its own scenario's catalog, as in the federation and in evaluation), same model
  and total steps as the federation: an upper reference, never a deployment mode.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from client.evaluation import PerUser, evaluate, frozen_table, per_user_file, popularity_metrics, save_per_user
from client.training import LocalData, build_model, train_round
from shared.config import Config
from shared.data import Scenario, Split
from shared.metrics import Row


def split_metrics(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"valid.ndcg@10": x}`` -> ``{"valid": {"ndcg@10": x}}``."""
    out: dict[str, dict[str, float]] = {"valid": {}, "test": {}}
    for key, value in flat.items():
        split, name = key.split(".", 1)
        out[split][name] = value
    return out


def evaluated(
    folder: Path | None, data: LocalData, server_round: int, measure: Callable[[PerUser], dict[str, float]]
) -> dict[str, dict[str, float]]:
    """``measure`` (an evaluation filling per-user values) as split metrics; the per-user values are saved
    under ``folder`` (:func:`per_user_file`) when given, for paired intervals."""
    values: PerUser = {}
    flat = measure(values)
    if folder is not None:
        save_per_user(per_user_file(folder, data.scenario.name, server_round), values)
    return split_metrics(flat)


def popularity_rows(
    datasets: Iterable[LocalData], vectors: dict[str, torch.Tensor] | None = None, folder: Path | None = None
) -> list[Row]:
    """Popularity per scenario; ILD/coverage of its top 10 where the scenario's frozen item vectors are given."""
    return [
        {
            "round": 0,
            "scenario": d.scenario.name,
            "reference": "popularity",
            **evaluated(folder, d, 0, functools.partial(popularity_metrics, d, (vectors or {}).get(d.scenario.name))),
        }
        for d in datasets
    ]


def zero_shot_rows(
    cfg: Config, datasets: Iterable[LocalData], folder: Path | None = None
) -> tuple[list[Row], dict[str, torch.Tensor]]:
    """The untrained model: LoRA at init is the frozen encoder, the sequence encoder at init the plain mean
    of the last ``model.history`` item vectors (its output layer starts at zero), the item memory zero,
    and the head at init ranks by their cosine. Also returns each scenario's frozen item vectors."""
    rows, vectors = [], {}
    for d in datasets:
        model = build_model(cfg, d)
        table = vectors[d.scenario.name] = frozen_table(cfg, d.scenario.texts)  # = model.item_table() at init
        at_init = (table, torch.zeros(len(table)))
        split = evaluated(folder, d, 0, functools.partial(evaluate, model, d, cfg, at_init, table))
        rows.append({"round": 0, "scenario": d.scenario.name, "reference": "zero_shot", **split})
    return rows, vectors


def local_rows(
    cfg: Config, data: LocalData, on_row: Callable[[Row], None] | None = None, folder: Path | None = None
) -> list[Row]:
    """One scenario alone: the same model (item memory included), initial weights, rounds and steps as a
    federated client."""
    model = build_model(cfg, data)  # same seed as the server's initial weights
    vectors = frozen_table(cfg, data.scenario.texts)
    rows: list[Row] = []
    for server_round in range(1, cfg.fed.rounds + 1):
        stats = train_round(model, data, cfg, server_round)
        row: Row = {
            "round": server_round,
            "scenario": data.scenario.name,
            "reference": "local",
            "train": stats,
            **evaluated(folder, data, server_round, functools.partial(evaluate, model, data, cfg, None, vectors)),
        }
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def pool(datasets: Sequence[LocalData]) -> tuple[LocalData, list[int]]:
    """Every scenario's training split in one dataset over the concatenated catalogs (ids prefixed
    ``NAME/``; each user's softmax stays in its own catalog: ``LocalData.catalogs``); returns it and each
    scenario's item offset. Nothing of any evaluation split is included."""
    offsets = np.cumsum([0] + [d.scenario.num_items for d in datasets[:-1]]).tolist()
    user_offsets = np.cumsum([0] + [len(d.split.train) for d in datasets[:-1]]).tolist()
    labelled = sorted({k for d in datasets for k in d.split.train_labels})
    train = [seq + off for d, off in zip(datasets, offsets, strict=True) for seq in d.split.train]
    labels = {
        k: [
            d.split.train_labels[k][u] if k in d.split.train_labels else np.full(len(seq), np.nan, dtype=np.float32)
            for d in datasets
            for u, seq in enumerate(d.split.train)
        ]
        for k in labelled
    }
    scenario = Scenario(
        name="pooled",
        objectives=datasets[0].scenario.objectives[:1] + tuple(labelled),
        item_ids=[f"{d.scenario.name}/{i}" for d in datasets for i in d.scenario.item_ids],
        texts=[t for d in datasets for t in d.scenario.texts],
        users=[f"{d.scenario.name}/{u}" for d in datasets for u in d.scenario.users],
        sequences=train,
        labels=labels,
    )
    empty = np.zeros(0, dtype=np.int64)
    split = Split(train=train, train_labels=labels, eval_users=empty, valid_target=empty, test_target=empty)
    users = np.concatenate([d.trainable_users + off for d, off in zip(datasets, user_offsets, strict=True)])
    catalogs = tuple((off, off + d.scenario.num_items) for d, off in zip(datasets, offsets, strict=True))
    user_catalog = np.concatenate([np.full(len(d.split.train), c) for c, d in enumerate(datasets)])
    names = tuple(d.scenario.name for d in datasets)
    pooled = LocalData(scenario, split, users, sum(d.num_examples for d in datasets), catalogs, user_catalog, names)
    return pooled, offsets


def centralized_rows(
    cfg: Config, datasets: Sequence[LocalData], on_row: Callable[[Row], None] | None = None, folder: Path | None = None
) -> list[Row]:
    """One model on the pooled data: per round ``train.local-steps`` x scenarios steps (the federation's
    total), then each scenario evaluated on its own catalog (a slice of the pooled item table)."""
    pooled, offsets = pool(datasets)
    steps = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, local_steps=cfg.train.local_steps * len(datasets))
    )
    model = build_model(cfg, pooled)
    rows: list[Row] = []
    for server_round in range(1, cfg.fed.rounds + 1):
        stats = train_round(model, pooled, steps, server_round)
        table, bias = model.item_table()
        for d, off in zip(datasets, offsets, strict=True):
            own = (table[off : off + d.scenario.num_items], bias[off : off + d.scenario.num_items])
            split = evaluated(folder, d, server_round, functools.partial(evaluate, model, d, cfg, own, None))
            row: Row = {"round": server_round, "scenario": d.scenario.name, "reference": "centralized", "train": stats}
            rows.append(row | split)
            if on_row:
                on_row(rows[-1])
    return rows
