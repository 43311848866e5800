"""Local training of one scenario (plain or DP-SGD): plain functions, no Flower."""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shared.config import Config
from shared.data import Scenario, Split, leave_one_out
from shared.model import RecModel

from .privacy import DPSGD


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


def sample_users(data: LocalData, cfg: Config, rng: np.random.Generator, poisson: bool) -> np.ndarray:
    """Users of one step: ``train.batch-size`` drawn with replacement, or (under DP) each trainable user
    independently with probability batch-size / trainable users (Poisson sampling; may be empty)."""
    if poisson:
        rate = min(1.0, cfg.train.batch_size / len(data.trainable_users))  # as the privacy ledger accounts it
        return data.trainable_users[rng.random(len(data.trainable_users)) < rate]
    return rng.choice(data.trainable_users, size=cfg.train.batch_size)


def make_batch(
    data: LocalData, cfg: Config, users: np.ndarray, num_items: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training example per user: history (B, T), target (B,), labels (B, K) with nan = none,
    and the user's own ``train.negatives`` random catalog items (B, N)."""
    names = cfg.model.objective_names
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
    negatives = rng.integers(num_items, size=(len(users), cfg.train.negatives))
    return (
        history_tensor(histories, cfg.model.history),
        torch.as_tensor(np.asarray(targets, dtype=np.int64)),
        torch.from_numpy(labels),
        torch.as_tensor(negatives, dtype=torch.long),
    )


def loss_fn(
    model: RecModel,
    history: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    negatives: torch.Tensor,
    table: torch.Tensor,
    aux_weight: float,
    in_batch: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over users of each user's loss: sampled softmax of its target against negatives, plus
    ``aux_weight`` x the BCE of every labelled non-ranking objective on the target.

    Targets and negatives go fresh through the LoRA layers, one packed row per user (negatives from a
    round-start table would let the adapters pull every fresh target toward its user: measured, it
    collapses the item space); history vectors come from the item table refreshed at round start.

    ``in_batch=False``: a user's candidates are its target and its own random negatives, so its loss
    depends on its example alone and a per-example gradient is a per-user gradient (what DP-SGD clips).
    ``in_batch=True``: every user also ranks its target against all other users' targets and negatives
    of the batch (in-batch negatives: B x (1+N) candidates at no extra encoding cost; not per-user).
    Candidates equal to the user's target are left out of its softmax either way.
    """
    users = model.user_vectors(history, table)  # (B, H)
    ids = torch.cat([target[:, None], negatives], dim=1)  # (B, 1+N)
    items = model.encode_items(ids)  # (B, 1+N, H), fresh through LoRA
    rows = torch.arange(len(target))
    if in_batch:
        logits = model(users, items.reshape(-1, items.shape[-1]))  # (B, B(1+N), K): every fresh item of the batch
        ids, own = ids.reshape(1, -1), rows * ids.shape[1]
    else:
        logits = model(users, items)  # (B, 1+N, K)
        own = torch.zeros_like(rows)
    collide = ids == target[:, None]  # (B, C)
    collide[rows, own] = False
    rank = -logits[..., 0].masked_fill(collide, -torch.inf).log_softmax(-1)[rows, own]  # (B,)
    per_user, parts = rank, {"loss_rank": float(rank.detach().mean())}
    for k in range(1, logits.shape[-1]):
        mask = ~torch.isnan(labels[:, k])
        bce = F.binary_cross_entropy_with_logits(logits[rows, own, k], labels[:, k].nan_to_num(0.0), reduction="none")
        per_user = per_user + aux_weight * bce * mask
        parts[f"loss_aux{k}"] = float((bce * mask).detach().sum() / mask.sum().clamp(min=1))
    return per_user.mean(), parts


def train_round(
    model: RecModel, data: LocalData, cfg: Config, server_round: int, privacy: DPSGD | None = None
) -> dict[str, float]:
    """``train.local-steps`` optimiser steps: plain ones (in-batch negatives unless
    ``train.in-batch-negatives`` is false), or (when ``privacy`` is given) DP-SGD steps on per-user
    losses; history vectors come from an item table refreshed at round start."""
    rng = round_rng(cfg, data.scenario.name, server_round)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    table = model.item_table()
    model.train()
    totals: dict[str, float] = {}
    with privacy.attached(model, optimizer) if privacy else contextlib.nullcontext(optimizer) as step_optimizer:
        for _ in range(cfg.train.local_steps):
            users = sample_users(data, cfg, rng, poisson=privacy is not None)
            step_optimizer.zero_grad(set_to_none=True)
            if len(users):
                batch = make_batch(data, cfg, users, model.num_items, rng)
                loss, parts = loss_fn(
                    model,
                    *batch,
                    table,
                    cfg.train.aux_weight,
                    in_batch=cfg.train.in_batch_negatives and privacy is None,
                )
                loss.backward()
                parts = {"loss": float(loss.detach()), **parts}
            else:  # an empty Poisson batch is still a noisy step
                privacy.empty_batch(params)  # type: ignore[union-attr]
                parts = {}
            if privacy is not None:
                privacy.step(step_optimizer, model)
            else:
                step_optimizer.step()
            for key, value in parts.items():
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
