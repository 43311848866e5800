"""Local training of one scenario (plain or DP-SGD): plain functions, no Flower."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from shared.config import Config
from shared.data import Scenario, Split, leave_one_out
from shared.model import ADAPTER_MARK, PRIVATE_PREFIX, REPEAT_NAME, RecModel, mean_pairwise_cosine

from .privacy import DPSGD


@dataclass
class LocalData:
    """A scenario with its split and the sampling tables training needs."""

    scenario: Scenario
    split: Split
    trainable_users: np.ndarray  # users with >= 2 training items (a history and a target)
    num_examples: int  # training positions: (history, next item) pairs in the training split
    # Pooled data (the centralized reference): item ranges [lo, hi) of each original catalog and each
    # user's range: a position's softmax covers its own catalog only. Empty: one catalog.
    catalogs: tuple[tuple[int, int], ...] = ()
    user_catalog: np.ndarray | None = None
    catalog_names: tuple[str, ...] = ()  # pooled: the scenario of each catalog

    @property
    def part_names(self) -> tuple[str, ...]:
        """The scenario of each catalog part (one part: this scenario)."""
        return self.catalog_names or (self.scenario.name,)


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


def shard(data: LocalData, index: int, count: int) -> LocalData:
    """One of ``count`` clients that split a scenario's users (user index mod ``count`` == ``index``): its
    trainable users, evaluated users and impressions only, under the name ``SCENARIO-INDEX`` (the catalog
    is the scenario's; the simulation of many clients on one machine uses it)."""
    if count == 1:
        return data
    s = data.split
    keep = s.eval_users % count == index
    log = data.scenario.impressions
    positions = {}
    for name in ("valid_impressions", "test_impressions"):
        at = getattr(s, name)
        positions[name] = at if log is None else at[log.users[at] % count == index]
    split = dataclasses.replace(
        s,
        eval_users=s.eval_users[keep],
        valid_target=s.valid_target[keep],
        test_target=s.test_target[keep],
        **positions,
    )
    users = data.trainable_users[data.trainable_users % count == index]
    if len(users) == 0:
        raise ValueError(f"scenario '{data.scenario.name}' has no trainable user for shard {index} of {count}")
    scenario = dataclasses.replace(data.scenario, name=f"{data.scenario.name}-{index}")
    examples = int(sum(len(s.train[u]) - 1 for u in users))
    return dataclasses.replace(data, scenario=scenario, split=split, trainable_users=users, num_examples=examples)


def history_tensor(sequences: list[np.ndarray], length: int) -> torch.Tensor:
    """(B, length) item indices of each sequence's last ``length`` items, oldest first, left-padded with -1
    (the most recent item is always in the last column)."""
    out = torch.full((len(sequences), length), -1, dtype=torch.long)
    for row, seq in enumerate(sequences):
        recent = np.asarray(seq[-length:], dtype=np.int64)
        if len(recent):
            out[row, length - len(recent) :] = torch.from_numpy(recent)
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


@dataclass
class Batch:
    """One training sequence per user (oldest first, left-padded with -1): the model reads ``seq[:, :-1]``
    and predicts ``seq[:, 1:]`` at every position."""

    seq: torch.Tensor  # (B, T+1) item indices
    labels: torch.Tensor  # (B, T+1, K) objective labels, nan = none (objective 0: 1 for every real item)
    fresh: torch.Tensor  # (B, C) distinct items per user encoded fresh through LoRA: its targets first
    catalog: torch.Tensor | None = None  # (B,) each user's catalog (LocalData.catalogs) when pooled
    catalogs: tuple[tuple[int, int], ...] = ()
    negatives: tuple[torch.Tensor | None, ...] = ()  # per catalog: sampled negatives (K,), None = the whole catalog
    # with a repeat logit: each input position's index in its user's training sequence (B, T) (padding < 0)
    # and where each item first occurs in it (B, N) (NEVER if not): item i is seen at t iff first <= at
    at: torch.Tensor | None = None
    first: torch.Tensor | None = None

    def had(self, items: torch.Tensor) -> torch.Tensor | None:
        """Whether each user had each of ``items`` up to and including each input position: items (C,) for
        every user or (B, C) each user's own -> (B, T, C) bool; None without a repeat logit."""
        if self.at is None or self.first is None:
            return None
        first = self.first[:, items] if items.dim() == 1 else self.first.gather(1, items)  # (B, C)
        return first[:, None, :] <= self.at[..., None]

    def had_each(self, items: torch.Tensor) -> torch.Tensor | None:
        """Whether each user had, up to each input position, that position's item of ``items`` (B, T) (e.g. its
        target) -> (B, T) bool; None without a repeat logit."""
        if self.at is None or self.first is None:
            return None
        return self.first.gather(1, items.clamp(min=0)) <= self.at


NEVER = np.iinfo(np.int32).max  # first occurrence of an item a user never had


def make_batch(
    data: LocalData,
    cfg: Config,
    users: np.ndarray,
    num_items: int,
    rng: np.random.Generator,
    recent: bool = False,
    per_user: bool = False,
    with_fresh: bool = True,
) -> Batch:
    """Each user's window of ``model.history`` + 1 consecutive training items, ending at a random point
    (every position of a long sequence is a target in some window; a short sequence is taken whole) or,
    with ``recent``, at its end; its labels, and ``train.fresh-items`` distinct items per user: its
    window's targets, topped up with random catalog items. ``per_user`` (DP: each user's fresh items are
    its only candidates in the fresh softmax) takes at least two, since a softmax over one has no gradient;
    ``with_fresh=False`` takes none (a step on the item table alone). With a repeat logit (``model.repeat-logit``
    and ``model.item-memory``): also where each item first occurs in each user's sequence and the index of each
    input position (:meth:`Batch.had`)."""
    names, length = cfg.model.objective_names, cfg.model.history + 1
    repeats = cfg.model.repeat_logit and cfg.model.item_memory
    wanted = max(cfg.train.fresh_items, 2) if per_user and cfg.train.fresh_items else cfg.train.fresh_items
    wanted = wanted if with_fresh else 0
    fresh_count = min(wanted, num_items)
    windows, fresh = [], np.zeros((len(users), fresh_count), dtype=np.int64)
    labels = np.full((len(users), length, len(names)), np.nan, dtype=np.float32)
    at = np.full((len(users), length - 1), -1, dtype=np.int64) if repeats else None
    first = np.full((len(users), num_items), NEVER, dtype=np.int32) if repeats else None
    for row, u in enumerate(users):
        seq = data.split.train[u]
        end = len(seq) if recent else int(rng.integers(min(length, len(seq)), len(seq) + 1))
        start = max(0, end - length)
        windows.append(seq[start:end])
        if at is not None and first is not None:  # the window's inputs are its items but the last
            at[row, length - (end - start) :] = np.arange(start, end - 1)
            items, where = np.unique(seq[:end], return_index=True)
            first[row, items] = where
        labels[row, length - (end - start) :, 0] = 1.0
        for k, name in enumerate(names[1:], start=1):
            if name in data.split.train_labels:
                labels[row, length - (end - start) :, k] = data.split.train_labels[name][u][start:end]
        targets = np.unique(seq[start + 1 : end])
        chosen = rng.choice(targets, size=min(fresh_count, len(targets)), replace=False)
        while len(chosen) < fresh_count:  # top up with random catalog items the user does not have yet
            extra = rng.integers(num_items, size=fresh_count)
            chosen = np.concatenate([chosen, extra[~np.isin(extra, chosen)]])[:fresh_count]
            chosen = np.asarray(list(dict.fromkeys(chosen.tolist())), dtype=np.int64)
        fresh[row] = chosen
    catalog = None if data.user_catalog is None else torch.from_numpy(data.user_catalog[users])
    seq = history_tensor(windows, length)
    negatives: tuple[torch.Tensor | None, ...] = ()
    if cfg.train.negatives and not per_user:  # uniform, without replacement, from each catalog larger than K
        k = cfg.train.negatives
        negatives = tuple(
            torch.from_numpy(lo + rng.choice(hi - lo, size=k, replace=False)) if hi - lo > k else None
            for lo, hi in (data.catalogs or ((0, num_items),))
        )
    batch = Batch(seq, torch.from_numpy(labels), torch.from_numpy(fresh), catalog, data.catalogs, negatives)
    if at is not None and first is not None:
        batch.at, batch.first = torch.from_numpy(at), torch.from_numpy(first)
    return batch


def sampled_rank_logits(
    model: RecModel,
    users: torch.Tensor,
    targets: torch.Tensor,
    table: torch.Tensor,
    bias: torch.Tensor,
    negatives: torch.Tensor,
    seen: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Ranking logits (P, 1 + K) of users (P, H) against their own target (column 0) and the shared uniform
    negatives (K,) (a negative equal to the position's target masked out). Every negative has the same
    sampling probability, so this sampled softmax needs no log-probability correction; its cross-entropy
    with label 0 approximates the full-catalog loss (exactly it when the negatives are every item).
    ``seen``: whether each position's user already had its target (P,) and each negative (P, K) (bool, for
    :meth:`RecModel.repeat_logits`)."""
    own = model.head.similarity((users * table[targets]).sum(-1, keepdim=True))[..., 0] + bias[targets]
    if seen is not None:
        own = own + model.repeat_logits(seen[0])
    others = model.scores(users, table[negatives], bias[negatives], None if seen is None else seen[1])
    others = others.masked_fill(negatives[None] == targets[:, None], float("-inf"))
    return torch.cat([own[:, None], others], dim=1)


def loss_fn(
    model: RecModel, batch: Batch, text: torch.Tensor, aux_weight: float, shared: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over users of each user's loss, a mean over the positions of its sequence of:

    - the full-catalog softmax cross-entropy of the next item over the item table (``text`` (N, H), the
      text vectors from the last refresh, no gradient, plus the private memory with its gradient) or, with
      ``batch.negatives`` (``train.negatives``), its sampled estimate (:func:`sampled_rank_logits`);
    - the softmax cross-entropy of the next item among the fresh items (``batch.fresh``, encoded anew
      through LoRA), at the positions whose next item is one of them: the adapters' gradient. Every
      candidate of this softmax is fresh: a stale table among the candidates would let the adapters raise
      every fresh target by moving all fresh items toward the users (measured: the item space collapses);
    - ``aux_weight`` x the BCE of every labelled non-ranking objective on the next item.

    ``shared=True``: the fresh items of the whole batch are every user's candidates. ``shared=False`` (DP):
    each user's are its own, so a user's loss depends on its own data alone and a per-example gradient is
    a per-user gradient.
    """
    inputs, targets = batch.seq[:, :-1], batch.seq[:, 1:]  # (B, T) each
    mask = inputs >= 0
    valid = mask & (targets >= 0)
    index = torch.arange(text.shape[0])
    table, bias = model.item_vectors(text, index), model.item_bias(index)  # (N, H), (N,)
    users = model.user(table[inputs.clamp(min=0)], mask)  # (B, T, H): one user vector per position
    catalogs = batch.catalogs or ((0, len(index)),)
    catalog = batch.catalog if batch.catalog is not None else torch.zeros(len(inputs), dtype=torch.long)
    if shared:  # the real positions only (short sequences' windows are mostly padding), each on its catalog
        full = users.new_zeros(valid.shape)
        for c, (lo, hi) in enumerate(catalogs):
            at = valid & (catalog == c)[:, None]
            if not bool(at.any()):
                continue
            sampled = batch.negatives[c] if batch.negatives else None
            if sampled is None:
                had = batch.had(index[lo:hi])  # (B, T, N_c) or None: the repeat logit's items
                own = None if had is None else had[at]
                logits, label = model.scores(users[at], table[lo:hi], bias[lo:hi], own), targets[at] - lo
            else:
                had, had_target = batch.had(sampled), batch.had_each(targets)  # (B, T, K), (B, T)
                seen = None if had is None or had_target is None else (had_target[at], had[at])
                logits = sampled_rank_logits(model, users[at], targets[at], table, bias, sampled, seen)
                label = torch.zeros(len(logits), dtype=torch.long)
            full = full.masked_scatter(at, F.cross_entropy(logits, label, reduction="none"))
    else:  # DP: per-sample gradients need the user dimension first in every layer
        logits = model.scores(users, table, bias, batch.had(index)).transpose(1, 2)  # (B, N, T)
        first = torch.tensor([r[0] for r in catalogs])[catalog]  # (B,) each user's catalog: [first, end)
        end = torch.tensor([r[1] for r in catalogs])[catalog]
        if len(catalogs) > 1:
            outside = (index[None] < first[:, None]) | (index[None] >= end[:, None])  # (B, N)
            logits = logits.masked_fill(outside[..., None], float("-inf"))
        padded_target = torch.where(targets >= 0, targets, first[:, None])  # inside the catalog: a finite loss, masked
        full = F.cross_entropy(logits, padded_target, reduction="none")
    per_user = (full * valid).sum(1) / valid.sum(1).clamp(min=1)
    parts = {"loss_rank": float(per_user.detach().mean())}
    if batch.fresh.shape[1]:
        ids = batch.fresh.unique()[None] if shared else batch.fresh  # (G, C), G = 1 or B
        fresh = model.item_vectors(model.encode_items(ids[0])[None] if shared else model.encode_items(ids), ids)
        logits = model.head.similarity((users @ fresh.transpose(1, 2))[..., None])[..., 0] + bias[ids][:, None]
        had = batch.had(ids[0] if shared else ids)  # (B, T, C): whether each user had each of its candidates
        if had is not None:
            logits = logits + model.repeat_logits(had)
        hit = targets[..., None] == ids[:, None, :]  # (B, T, C)
        scored = valid & hit.any(-1)
        own = (logits.logsumexp(-1) - (logits * hit).sum(-1)) * scored  # (B, T)
        per_user = per_user + own.sum(1) / scored.sum(1).clamp(min=1)
        parts["loss_fresh"] = float((own.sum() / scored.sum().clamp(min=1)).detach())
    aux_labels = batch.labels[:, 1:, 1:]  # (B, T, K-1)
    if aux_labels.shape[-1]:
        aux = model.head.pairs(users, table[targets.clamp(min=0)])  # (B, T, K-1)
        for k in range(aux_labels.shape[-1]):
            labelled = valid & ~torch.isnan(aux_labels[..., k])
            bce = F.binary_cross_entropy_with_logits(aux[..., k], aux_labels[..., k].nan_to_num(0.0), reduction="none")
            per_user = per_user + aux_weight * (bce * labelled).sum(1) / labelled.sum(1).clamp(min=1)
            parts[f"loss_aux{k + 1}"] = float((bce * labelled).detach().sum() / labelled.sum().clamp(min=1))
    parts["positions"] = float(valid.sum())
    return per_user.mean(), parts


def train_round(
    model: RecModel, data: LocalData, cfg: Config, server_round: int, privacy: DPSGD | None = None
) -> dict[str, float]:
    """``train.local-steps`` optimiser steps on sequences (loss at every position): plain ones, or (when
    ``privacy`` is given) DP-SGD steps on per-user losses, with :meth:`RecModel.catalog_parts` (item
    memory, text adaptor) frozen, and the LoRA adapters too when ``train.fresh-items`` is 0. The text
    table is refreshed at round start and every ``train.table-refresh`` steps.
    Returns the mean losses, the positions trained on and the item space's mean pairwise cosine."""
    rng = round_rng(cfg, data.scenario.name, server_round)
    held: list[torch.nn.Parameter] = []  # trainable weights this round leaves as they are
    if privacy is not None:
        held = [p for part in model.catalog_parts() for p in part.parameters()]
        if not cfg.train.fresh_items:  # no item is encoded anew, so no gradient reaches the adapters
            held += [p for n, p in model.named_parameters() if ADAPTER_MARK in n]
    held = [p for p in held if p.requires_grad]
    for p in held:
        p.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    id_prefix = PRIVATE_PREFIX + "ids."  # the private ID embeddings: at train.lr, as SASRec's (measured)
    ids = [p for n, p in named if n.startswith(id_prefix)]
    repeat = [p for n, p in named if n == REPEAT_NAME]  # one scalar that must travel far: its own, fast rate
    memory = [p for n, p in named if n.startswith(PRIVATE_PREFIX) and not n.startswith(id_prefix) and n != REPEAT_NAME]
    lora = [p for n, p in named if ADAPTER_MARK in n]
    rest = [p for n, p in named if not n.startswith(PRIVATE_PREFIX) and ADAPTER_MARK not in n]
    groups: list[dict[str, Any]] = [
        {"params": rest + ids},
        {"params": lora, "lr": cfg.train.lora_lr},
        {"params": memory, "lr": cfg.train.memory_lr},
        {"params": repeat, "lr": cfg.train.repeat_lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    text = model.text_table()
    model.train()
    totals: dict[str, float] = {}
    steps, started = cfg.train.local_steps, time.perf_counter()
    private = privacy is not None  # DP: Poisson-sampled users, per-user fresh items on every step
    try:
        with privacy.attached(model, optimizer) if privacy else contextlib.nullcontext(optimizer) as step_optimizer:
            bar = tqdm(range(steps), desc=f"{data.scenario.name} round {server_round}", unit="step", disable=None)
            for step in bar:  # (the bar shows on a terminal only: not in Flower's client processes or logs)
                if cfg.train.table_refresh and step and step % cfg.train.table_refresh == 0:
                    text = model.text_table()
                users = sample_users(data, cfg, rng, poisson=private)
                step_optimizer.zero_grad(set_to_none=True)
                if len(users):
                    fresh = private or step % cfg.train.fresh_every == 0
                    batch = make_batch(data, cfg, users, model.num_items, rng, per_user=private, with_fresh=fresh)
                    loss, parts = loss_fn(model, batch, text, cfg.train.aux_weight, shared=not private)
                    loss.backward()
                    parts = {"loss": float(loss.detach()), **parts}
                else:  # an empty Poisson batch is still a noisy step
                    privacy.empty_batch(params)  # type: ignore[union-attr]
                    parts = {}
                if privacy is not None:
                    privacy.step(step_optimizer, model)
                else:
                    step_optimizer.step()
                for key, value in parts.items():  # positions summed, the rest averaged over steps
                    totals[key] = totals.get(key, 0.0) + (value if key == "positions" else value / steps)
    finally:  # a failed round leaves the model as it found it: eval mode, the held weights trainable
        model.eval()
        for p in held:
            p.requires_grad_(True)
    totals["positions_per_second"] = totals.get("positions", 0.0) / (time.perf_counter() - started)
    totals["item_cosine"] = item_space_cosine(model, rng)
    return totals


COSINE_SAMPLE = 1024  # items whose mean pairwise cosine stands for the item space's


def item_space_cosine(model: RecModel, rng: np.random.Generator) -> float:
    """Mean pairwise cosine of the item vectors (text through the current adapters, adaptor, memory) of
    the whole catalog or, above ``COSINE_SAMPLE`` items, of a random sample of that many (an unbiased
    estimate at a fraction of a catalog encoding: the collapse check of every round)."""
    n = model.num_items
    index = torch.arange(n)
    if n > COSINE_SAMPLE:
        index = torch.from_numpy(np.sort(rng.choice(n, COSINE_SAMPLE, replace=False)))
    with torch.no_grad():
        return mean_pairwise_cosine(model.item_vectors(model.encode_catalog(index), index))


def build_model(cfg: Config, data: LocalData) -> RecModel:
    """A model for this scenario's catalog (frozen prefix cached)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = RecModel(cfg)
    model.attach_catalog(data.scenario.texts, data.catalogs, data.part_names)
    model.eval()
    return model
