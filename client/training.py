"""Local training and full-ranking evaluation of one scenario: plain functions, no Flower."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shared.config import Config
from shared.data import Scenario, Split, leave_one_out
from shared.model import RecModel


@dataclass
class LocalData:
    """A scenario with its split and the sampling tables training needs."""

    scenario: Scenario
    split: Split
    trainable_users: np.ndarray  # users with >= 2 training items (a history and a target)
    num_examples: int  # (history, target) pairs in the training split


def prepare(scenario: Scenario, cfg: Config) -> LocalData:
    """Split a scenario and check that its objectives are ones the model has."""
    names = cfg.model.objective_names
    unknown = [o for o in scenario.objectives if o not in names]
    if unknown or scenario.objectives[0] != names[0]:
        raise ValueError(
            f"scenario '{scenario.name}' declares objectives {list(scenario.objectives)}; the model has "
            f"{list(names)} (config key 'model.objectives') and both must start with '{names[0]}'"
        )
    split = leave_one_out(scenario)
    lengths = np.asarray([len(s) for s in split.train])
    users = np.flatnonzero(lengths >= 2)
    if len(users) == 0:
        raise ValueError(f"scenario '{scenario.name}': no user has two training interactions")
    if len(split.eval_users) == 0:
        raise ValueError(f"scenario '{scenario.name}': no user has the three interactions evaluation needs")
    return LocalData(scenario, split, users, int((lengths[users] - 1).sum()))


def history_tensor(sequences: list[np.ndarray], length: int) -> torch.Tensor:
    """(B, length) item indices, most recent first, -1 padding."""
    out = torch.full((len(sequences), length), -1, dtype=torch.long)
    for row, seq in enumerate(sequences):
        recent = seq[::-1][:length]
        out[row, : len(recent)] = torch.from_numpy(recent.copy())
    return out


def round_rng(cfg: Config, scenario: str, server_round: int) -> np.random.Generator:
    """The sampling stream of one scenario in one round: fixed by seed, scenario and round."""
    return np.random.default_rng([cfg.train.seed, zlib.crc32(scenario.encode()), server_round])


def sample_batch(
    data: LocalData, cfg: Config, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training example per sampled user: history (B, T), target (B,), labels (B, K) with nan = none."""
    names = cfg.model.objective_names
    users = rng.choice(data.trainable_users, size=cfg.train.batch_size)
    histories, targets = [], []
    labels = np.full((len(users), len(names)), np.nan, dtype=np.float32)
    labels[:, 0] = 1.0
    for row, u in enumerate(users):
        seq = data.split.train[u]
        t = int(rng.integers(1, len(seq)))
        histories.append(seq[:t])
        targets.append(seq[t])
        for k, name in enumerate(names[1:], start=1):
            if name in data.split.train_labels:
                labels[row, k] = data.split.train_labels[name][u][t]
    return (
        history_tensor(histories, cfg.model.history),
        torch.as_tensor(np.asarray(targets), dtype=torch.long),
        torch.from_numpy(labels),
    )


def loss_fn(
    model: RecModel,
    history: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    negatives: torch.Tensor,
    table: torch.Tensor,
    aux_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sampled-softmax ranking loss over batch targets + shared negatives, plus masked BCE per objective.

    Objectives without a label in the batch contribute a zero-weighted loss, so every head
    parameter stays in the backward pass.
    """
    candidates = torch.cat([target, negatives])  # (C,)
    users = model.user_vectors(history, table)  # (B, H)
    items = model.encode_items(candidates)  # (C, H), through LoRA
    logits = model(users, items)  # (B, C, K)
    batch = target.shape[0]
    own = torch.arange(batch)
    hits = candidates[None, :] == target[:, None]  # (B, C): same item as the row's target
    hits[own, own] = False
    rank_logits = logits[..., 0].masked_fill(hits, -torch.inf)
    rank_loss = F.cross_entropy(rank_logits, own)
    total, parts = rank_loss, {"loss_rank": float(rank_loss.detach())}
    pair = logits[own, own]  # (B, K): logits of each user's own target
    for k in range(1, logits.shape[-1]):
        mask = ~torch.isnan(labels[:, k])
        bce = F.binary_cross_entropy_with_logits(pair[:, k], labels[:, k].nan_to_num(0.0), reduction="none")
        aux = (bce * mask).sum() / mask.sum().clamp(min=1)
        total = total + aux_weight * aux
        parts[f"loss_aux{k}"] = float(aux.detach())
    return total, parts


def train_round(model: RecModel, data: LocalData, cfg: Config, server_round: int) -> dict[str, float]:
    """``train.local-steps`` optimiser steps; history vectors come from a table refreshed at round start."""
    rng = round_rng(cfg, data.scenario.name, server_round)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    table = model.item_table()
    model.train()
    totals: dict[str, float] = {}
    for _ in range(cfg.train.local_steps):
        history, target, labels = sample_batch(data, cfg, rng)
        negatives = torch.as_tensor(rng.integers(model.num_items, size=cfg.train.negatives), dtype=torch.long)
        loss, parts = loss_fn(model, history, target, labels, negatives, table, cfg.train.aux_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in {"loss": float(loss.detach()), **parts}.items():
            totals[key] = totals.get(key, 0.0) + value / cfg.train.local_steps
    model.eval()
    return totals


def build_model(cfg: Config, data: LocalData) -> RecModel:
    """A model for this scenario's catalog (frozen prefix cached)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = RecModel(cfg)
    model.attach_catalog(data.scenario.texts)
    model.eval()
    return model
