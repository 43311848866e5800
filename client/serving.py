"""Recommendations from a federated checkpoint on a scenario's own catalog.

Item vectors (and the head's per-item features) are computed once per (checkpoint, catalog) and
cached on disk, keyed by the hashes of the checkpoint weights and the catalog texts.

Small catalogs are scored whole by the head. A catalog of at least ``serve.ann-min-items`` items is served
in two stages: an HNSW index (FAISS, inner product) over the item vectors, augmented so that the inner
product orders items exactly as the ranking objective's logit does, retrieves ``serve.ann-candidates``
items; the head scores only those (every objective), the utility and MMR run on them. The index is
built once per (checkpoint, catalog) and cached next to the item vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.checkpoint import checkpoint_round, read_checkpoint, weights_digest
from shared.config import Config, ServeConfig
from shared.data import Scenario, load_scenario
from shared.model import RecModel, full_encoder_items
from shared.records import load_trainable

from .bandit import ItemStats, corrected, explore
from .evaluation import seen_mask
from .ranking import mmr, utility
from .state import PRIVATE_FILE, load_personal, load_private, private_scenario, round_copy

logger = logging.getLogger(__name__)
HNSW_NEIGHBOURS = 48  # links per node (M) of the HNSW graph
HNSW_BUILD_DEPTH = 200  # efConstruction (M 48 / 200 vs 32 / 80, 100,000 items: recall@100 0.975 vs 0.907)
INDEX_CHECK_ROWS = 64  # rows of a cached index compared with the vectors it must hold


class RequestError(ValueError):
    """A request that cannot be answered as asked; the message says what to fix."""


@dataclass(frozen=True)
class Request:
    """What a caller asks for. Exactly one of ``user_id``, ``history`` and ``history_texts``."""

    scenario: str
    user_id: str | None = None
    history: Sequence[str] | None = None  # item ids of this scenario, oldest first
    history_texts: Sequence[str] | None = None  # free item texts (e.g. from another scenario), oldest first
    k: int = 10
    weights: Mapping[str, float] | None = None  # objective -> weight; default serve.weights
    diversity: float | None = None  # MMR lambda; default serve.diversity
    exclude_seen: bool = False


@dataclass
class Catalog:
    """One scenario's catalog as the service needs it."""

    scenario: Scenario
    index: dict[str, int]  # item id -> row
    histories: dict[str, np.ndarray]  # user id -> item rows, oldest first
    table: torch.Tensor  # (N, H) item vectors (RecModel.item_vectors: adapted text + private residual, if any)
    bias: torch.Tensor  # (N,) the scenario's private output biases (zeros without its memory)
    repeat: torch.Tensor  # (1,) its private repeat logit: added to the items of the request's history (0 without)
    features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # head's per-item features
    values: torch.Tensor | None  # (N,) item values
    value_range: tuple[float, float] | None  # the catalog's known min and max value: one scale for candidates too
    model: RecModel  # the checkpoint's model with this scenario's personal modules (fed.personal), if it has them
    ann: faiss.IndexHNSWFlat | None = None  # HNSW over the augmented item vectors (large catalogs only)
    stats: ItemStats | None = None  # feedback per item (catalog rows), when the service keeps feedback


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def catalog_hash(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cache_name(checkpoint_id: str, texts: Sequence[str], private: Path | None = None) -> str:
    """File name of the item-vector cache of one (checkpoint, catalog, private memory)."""
    memory = f"-{file_hash(private)}" if private is not None else ""
    return f"{checkpoint_id}-{catalog_hash(texts)}{memory}.safetensors"


def save_table(path: Path, table: torch.Tensor, bias: torch.Tensor, repeat: torch.Tensor) -> None:
    """Write an item-vector table, its biases and the repeat logit atomically (temp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"table": table.contiguous(), "bias": bias.contiguous(), "repeat": repeat.contiguous()}, str(tmp))
    tmp.replace(path)


def retrieval_vectors(table: torch.Tensor, bias: torch.Tensor, scale: float) -> np.ndarray:
    """Items as (N, H+1) rows [v, b / a] whose inner product with a query [u, 1] is (a u.v + b) / a: the ranking
    objective's logit a u.v + c + b, up to the constants a > 0 and c, so it orders items exactly as the head does."""
    return torch.cat([table, (bias / scale)[:, None]], dim=1).contiguous().numpy().astype(np.float32)


def hnsw_index(vectors: np.ndarray, path: Path | None) -> faiss.IndexHNSWFlat:
    """An inner-product HNSW index over ``vectors``, read from ``path`` when it holds these vectors (its shape
    and a sample of its rows match), else built (minutes for a million items) and written there atomically."""
    if path is not None and path.is_file():
        try:
            stored = faiss.read_index(str(path))
            if isinstance(stored, faiss.IndexHNSWFlat) and (stored.ntotal, stored.d) == vectors.shape:
                rows = np.linspace(0, len(vectors) - 1, min(INDEX_CHECK_ROWS, len(vectors))).astype(np.int64)
                if np.array_equal(np.stack([stored.reconstruct(int(r)) for r in rows]), vectors[rows]):
                    return stored
        except RuntimeError:  # unreadable: rebuild and overwrite
            pass
    logger.info("building the HNSW index of %d items (once per checkpoint and catalog)", len(vectors))
    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_BUILD_DEPTH
    index.add(vectors)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(index, str(tmp))
        tmp.replace(path)
    return index


def private_file(checkpoint: Path, scenario: str, state_dirs: Sequence[Path], run_dir: str = "") -> Path | None:
    """The scenario's private memory for a checkpoint (or adapter export) of round r: in each given state
    folder written for this scenario, then in the checkpoint's run folder (``RUN/clients/SCENARIO/``), the
    copy the client kept after round r of run ``run_dir`` (``private/<run key>/round-NNNN``, the memory that
    round was evaluated with), else its latest ``private.safetensors``; None: serve from text alone."""
    run, server_round = checkpoint_round(checkpoint)
    for folder in [Path(d) for d in state_dirs] + [run / "clients" / scenario]:
        paths = [folder / PRIVATE_FILE]
        if server_round is not None:
            paths.insert(0, round_copy(folder / PRIVATE_FILE, run_dir, server_round))
        for path in paths:
            if path.is_file() and private_scenario(path) == scenario:
                return path
    return None


class Recommender:
    """A loaded checkpoint plus the catalogs of the scenarios it serves."""

    def __init__(
        self,
        checkpoint: str | Path,
        scenarios: Sequence[str | Path],
        cache_dir: str | Path | None = None,
        serve: ServeConfig | None = None,
        state_dirs: Sequence[str | Path] = (),
    ) -> None:
        cfg, folder, weights = read_checkpoint(checkpoint)
        self.cfg: Config = dataclasses.replace(cfg, serve=serve) if serve is not None else cfg
        self.checkpoint = folder
        self.checkpoint_id = weights_digest(weights)
        self.weights = weights
        self.model = RecModel(self.cfg)
        load_trainable(self.model, weights)
        self.model.eval()
        self.objectives = self.cfg.model.objective_names
        self.dim = self.model.item_dim
        self.state_dirs = [Path(d) for d in state_dirs]
        self.catalogs: dict[str, Catalog] = {}
        for path in scenarios:
            scenario = load_scenario(path, lenient=self.cfg.data.lenient)
            if scenario.name in self.catalogs:
                raise ValueError(f"{path}: scenario '{scenario.name}' is given twice")
            self.catalogs[scenario.name] = self._catalog(scenario, cache_dir)

    def weights_norm(self) -> float:
        """L2 norm of all the shared weights served."""
        return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in self.weights.values()))

    def _catalog(self, scenario: Scenario, cache_dir: str | Path | None) -> Catalog:
        personal = self.cfg.fed.personal_modules
        private = (
            private_file(self.checkpoint, scenario.name, self.state_dirs, self.cfg.run.dir)
            if self.cfg.model.item_memory or personal
            else None
        )
        model = self.model.personal_copy() if private is not None and personal else self.model
        cached = Path(cache_dir) / cache_name(self.checkpoint_id, scenario.texts, private) if cache_dir else None
        table = bias = repeat = None
        if cached is not None and cached.is_file():
            try:
                stored = load_file(str(cached))  # in memory: the file may be replaced
                table, bias, repeat = (stored[k].clone() for k in ("table", "bias", "repeat"))
            except (SafetensorError, KeyError, OSError):  # unreadable (or older, without the repeat logit): recompute
                table = bias = repeat = None
            if table is not None and table.shape != (scenario.num_items, self.dim):
                table = bias = repeat = None
        if table is None or bias is None or repeat is None:
            model.attach_catalog(scenario.texts, names=[scenario.name])
            if private is not None:
                load_private(model, private, scenario.item_ids)
            table, bias = model.item_table()
            repeat = model.repeat_logits(torch.ones(1, dtype=torch.bool)).detach()
            if cached is not None:
                save_table(cached, table, bias, repeat)
        elif private is not None and personal:  # the table is cached; the user model is not
            load_personal(model, private)
        values = None if scenario.values is None else torch.from_numpy(scenario.values)
        known = None if values is None else values[torch.isfinite(values)]
        value_range = (float(known.min()), float(known.max())) if known is not None and len(known) else None
        scale = float(model.head.similarity.weight.detach())
        ann = None
        if 0 < self.cfg.serve.ann_min_items <= scenario.num_items:
            if scale > 0:
                path = cached.with_suffix(".hnsw") if cached is not None else None
                ann = hnsw_index(retrieval_vectors(table[:, : model.head.dim], bias, scale), path)
            else:  # a non-positive scale reverses the order: no inner-product index ranks by it
                logger.warning("%s: the ranking scale is %.3g <= 0; scoring every item", scenario.name, scale)
        return Catalog(
            scenario=scenario,
            index={item: i for i, item in enumerate(scenario.item_ids)},
            histories=dict(zip(scenario.users, scenario.sequences, strict=True)),
            table=table,
            bias=bias,
            repeat=repeat,
            features=model.head.item_features(table),
            values=values,
            value_range=value_range,
            model=model,
            ann=ann,
        )

    def candidates(self, user: torch.Tensor, catalog: Catalog, count: int) -> torch.Tensor | None:
        """Rows of the ``count`` best items by the ranking objective from the catalog's HNSW index
        (None: no index, every item is a candidate)."""
        if catalog.ann is None:
            return None
        text = user[0, : catalog.model.head.dim].detach()  # (a private ID part is not scored)
        query = torch.cat([text, user.new_ones(1)]).numpy()[None].astype(np.float32)
        depth = faiss.SearchParametersHNSW(efSearch=max(count, 128))  # type: ignore[attr-defined]  # per call: threads
        _, rows = catalog.ann.search(query, min(count, catalog.ann.ntotal), params=depth)
        return torch.from_numpy(rows[0][rows[0] >= 0]).long()

    def _weights(self, request: Request) -> torch.Tensor:
        if request.weights is None:
            default = self.cfg.serve.weight_values or (1.0,) + (0.0,) * (len(self.objectives) - 1)
            return torch.tensor(default, dtype=torch.float32)
        unknown = sorted(set(request.weights) - set(self.objectives))
        if unknown:
            raise RequestError(f"weights: unknown objectives {unknown}; this model has {list(self.objectives)}")
        values = [float(request.weights.get(o, 0.0)) for o in self.objectives]
        if any(not math.isfinite(w) or w < 0 for w in values) or not sum(values) > 0:
            raise RequestError(
                f"weights: need finite, non-negative numbers summing to > 0, got {dict(request.weights)}"
            )
        total = sum(values)  # normalised in float64: weights like 1e-46 or 1e38 neither vanish nor overflow
        return torch.tensor([w / total for w in values], dtype=torch.float32)

    def _user(self, request: Request, catalog: Catalog) -> tuple[torch.Tensor, np.ndarray]:
        """(user vector (1, H), the catalog rows of the history, for exclusion)."""
        given = [x is not None for x in (request.user_id, request.history, request.history_texts)]
        if sum(given) != 1:
            raise RequestError("give exactly one of user_id, history (item ids) or history_texts")
        length = self.cfg.model.history
        if request.history_texts is not None:
            texts = [t for t in request.history_texts if isinstance(t, str) and t.strip()]
            if not texts or len(texts) != len(request.history_texts):
                raise RequestError("history_texts must be a non-empty list of non-empty strings")
            text = full_encoder_items(catalog.model, list(texts[-length:]))  # (T, H), oldest first
            return catalog.model.user_from_vectors(catalog.model.text_item_vectors(text)), np.zeros(0, np.int64)
        if request.user_id is not None:
            if request.user_id not in catalog.histories:
                raise RequestError(f"user_id '{request.user_id}' has no history in scenario '{request.scenario}'")
            rows = catalog.histories[request.user_id]
        else:
            assert request.history is not None
            if len(request.history) == 0:
                raise RequestError("history is empty: give at least one item id")
            unknown = [i for i in request.history if i not in catalog.index]
            if unknown:
                raise RequestError(f"history: unknown item ids {unknown[:5]} in scenario '{request.scenario}'")
            rows = np.asarray([catalog.index[i] for i in request.history], dtype=np.int64)
        return catalog.model.user_from_vectors(catalog.table[torch.from_numpy(rows[-length:])]), rows

    def reward_weights(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """Objective -> weight of a request's utility (or the service's default), normalised to sum 1."""
        values = self._weights(Request(scenario="", weights=weights)).tolist()
        return dict(zip(self.objectives, values, strict=True))

    @torch.no_grad()
    def scored(
        self,
        catalog: Catalog,
        user: torch.Tensor,
        weights: torch.Tensor,
        rows: torch.Tensor | None = None,
        seen: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(objective probabilities (C, K), utility (C,), expected reward (C,)) of the catalog's items at ``rows``
        (default: all) for one user; in float64, where the ranking objective's probability near 1 keeps its order.
        ``seen``: the catalog rows of the user's history, whose ranking logit gets the scenario's repeat logit.

        The ranking objective is trained with a softmax over the catalog, so its sigmoid ranks but is no
        click probability (it is near 1 for most items). The expected reward of listing an item is the model's
        share of the user's next engagement going to it (softmax over the scored items) times the expected
        reward of an engagement (its weight plus the other objectives' probabilities x their weights)."""
        table, bias, features, values = catalog.table, catalog.bias, catalog.features, catalog.values
        if rows is not None:  # the head, the utility and MMR on the retrieved candidates only
            table, bias, values = table[rows], bias[rows], None if values is None else values[rows]
            features = (features[0][rows], features[1][rows], features[2][rows])
        logits = catalog.model.head.fast_scores(user, table, features)[0].double()  # (C, K)
        logits[:, 0] += bias
        if seen is not None and len(seen):
            had = seen_mask([seen], len(table))[0] if rows is None else torch.from_numpy(np.isin(rows.numpy(), seen))
            logits[:, 0] += had.double() * float(catalog.repeat)
        probs, weights = torch.sigmoid(logits), weights.double()
        scores = utility(probs, weights, values, self.cfg.serve.value_weight, catalog.value_range)
        expected = torch.softmax(logits[:, 0], dim=0) * (weights[0] + probs[:, 1:] @ weights[1:])
        return probs, scores, expected

    @torch.no_grad()
    def recommend(
        self, request: Request, policy: str | None = None, rng: np.random.Generator | None = None
    ) -> list[dict[str, object]]:
        """Top-k items: utility = weighted objective probabilities (+ value term), then MMR. With a policy other
        than greedy (default serve.policy) the list is ranked by the model's expected reward corrected by the
        items' feedback (client/bandit.py) and the policy fills its last serve.explore-slots slots from the next
        serve.explore-pool candidates. Each item carries its propensity (chance the policy lists it) and the
        model's expected reward (:meth:`scored`)."""
        catalog = self.catalogs.get(request.scenario)
        if catalog is None:
            raise RequestError(f"unknown scenario '{request.scenario}'; this service has {sorted(self.catalogs)}")
        if not 1 <= request.k <= self.cfg.serve.max_k:
            raise RequestError(f"k must be between 1 and {self.cfg.serve.max_k}, got {request.k}")
        diversity = self.cfg.serve.diversity if request.diversity is None else request.diversity
        if not 0.0 <= diversity <= 1.0:
            raise RequestError(f"diversity must be in [0, 1], got {diversity}")
        weights = self._weights(request)
        user, seen = self._user(request, catalog)
        rows = self.candidates(
            user, catalog, self.cfg.serve.ann_candidates + (len(seen) if request.exclude_seen else 0)
        )
        probs, scores, expected = self.scored(catalog, user, weights, rows, seen)
        if request.exclude_seen and len(seen):
            seen_rows = torch.from_numpy(seen)
            scores[torch.isin(rows, seen_rows) if rows is not None else seen_rows] = -torch.inf
        policy = policy or self.cfg.serve.policy
        if policy != "greedy" and catalog.stats is None:
            raise RequestError(f"policy '{policy}' learns from feedback: start the service with serve.feedback-db")
        stats = catalog.stats if catalog.stats is None or rows is None else catalog.stats.take(rows.numpy())
        listed = make_list(
            scores,
            expected,
            stats,
            (catalog.table if rows is None else catalog.table[rows])[:, : catalog.model.head.dim],
            request.k,
            diversity,
            self.cfg.serve,
            policy,
            rng,
        )
        items = listed.rows if rows is None else rows[listed.rows].tolist()  # their catalog rows
        sc = catalog.scenario
        return [
            {
                "item_id": sc.item_ids[item],
                "text": sc.texts[item],
                "score": float(listed.scores[i]),
                "objectives": {o: float(probs[i, j]) for j, o in enumerate(self.objectives)},
                "expected": float(expected[i]),
                "propensity": chance,
                "explored": n >= len(listed.rows) - listed.slots,
            }
            for n, (i, item, chance) in enumerate(zip(listed.rows, items, listed.propensity, strict=True))
        ]


@dataclass(frozen=True)
class Listing:
    """A list as a policy made it: candidate rows (the ranked slots first, then the exploration slots), each
    one's propensity, the number of exploration slots, and the (feedback-corrected) utility of every candidate."""

    rows: list[int]
    propensity: list[float]
    slots: int
    scores: torch.Tensor


def make_list(
    scores: torch.Tensor,
    expected: torch.Tensor,
    stats: ItemStats | None,
    vectors: torch.Tensor,
    k: int,
    diversity: float,
    serve: ServeConfig,
    policy: str,
    rng: np.random.Generator | None = None,
) -> Listing:
    """The list of ``k`` candidates: ``greedy`` is MMR over the utility ``scores`` (C,); another policy ranks the
    first k - serve.explore-slots slots by the model's ``expected`` reward (C,) corrected by each item's feedback
    ``stats`` (posterior mean, client/bandit.py; MMR over ``vectors``) and fills the rest from the next
    serve.explore-pool candidates. Candidates whose utility is -inf (excluded) are never listed."""
    slots = 0 if policy == "greedy" else min(serve.explore_slots, k)
    if slots:
        if stats is None:
            raise ValueError(f"policy '{policy}' needs the items' feedback statistics")
        mean = torch.from_numpy(corrected(expected.double().numpy(), stats, serve.prior_strength))
        scores = torch.where(torch.isfinite(scores), mean, -torch.inf)
    top = mmr(scores, vectors, k - slots, diversity, serve.mmr_pool)
    propensity, ranked = [1.0] * len(top), len(top)
    if slots:
        assert stats is not None
        rest = scores.clone()
        rest[top] = -torch.inf
        pool = torch.topk(rest, min(serve.explore_pool, int(torch.isfinite(rest).sum()))).indices.numpy()
        picked, chance = explore(
            policy, expected.double().numpy()[pool], stats.take(pool), slots, rng or np.random.default_rng(),
            strength=serve.prior_strength, epsilon=serve.epsilon, ucb_c=serve.ucb_c, draws=serve.draws,
        )  # fmt: skip
        top, propensity = top + pool[picked].tolist(), propensity + chance[picked].tolist()
    return Listing(top, propensity, len(top) - ranked, scores)
