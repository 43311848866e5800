"""Robust FedAvg over the shared weights: validates every reply, weighs it by what the server allows, bounds
its update, drops outliers, and keeps per-scenario metrics."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from shared.config import FedConfig
from shared.records import (
    ARRAYS,
    INFO,
    METRICS,
    NUM_EXAMPLES,
    from_arrayrecord,
    to_arrayrecord,
    validate_arrays,
)

log = logging.getLogger("flwr").getChild("crossrec")  # streamed by `flwr run --stream`

Expected = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def expected_from(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The (shape, dtype) every reply must match, taken from the global weights."""
    return {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()}


def scenario_of(msg: Message) -> str:
    """The scenario a reply says it comes from, else its node id."""
    if not msg.has_error() and INFO in msg.content.config_records:
        return str(msg.content.config_records[INFO].get("scenario", msg.metadata.src_node_id))
    return f"node {msg.metadata.src_node_id}"


def reply_problem(msg: Message, expected: Expected | None) -> str | None:
    """Why a reply cannot be used (None when it can). ``expected=None`` skips the weights (evaluate)."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    if METRICS not in content.metric_records:
        return f"no MetricRecord '{METRICS}'"
    metrics = content.metric_records[METRICS]
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric '{key}' is not a finite number: {value!r}"
    if expected is None:
        return None
    info = content.config_records.get(INFO)
    refused = info.get("refused") if info is not None else None
    if refused:
        return f"client refused: {refused!r}"
    examples = metrics.get(NUM_EXAMPLES)
    if not isinstance(examples, (int, float)) or not examples > 0:
        return f"metric '{NUM_EXAMPLES}' must be positive, got {examples!r}"
    if ARRAYS not in content.array_records:
        return f"no ArrayRecord '{ARRAYS}'"
    try:
        arrays = from_arrayrecord(content.array_records[ARRAYS])
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the reply unusable
        return f"undecodable arrays: {exc}"
    problems = validate_arrays(arrays, expected)
    return "; ".join(problems) if problems else None


def capped_shares(weights: Sequence[float], cap: float) -> np.ndarray:
    """Shares proportional to ``weights``, none above ``cap``: a capped reply keeps ``cap`` and the rest
    is shared out among the others in proportion (water-filling). A cap no assignment can meet
    (``len(weights) * cap < 1``) gives every reply the same share."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) * cap < 1:
        return np.full(len(w), 1.0 / len(w))
    w = w / w.max()  # claims up to 1e300 or 2**62 stay finite
    shares, capped = w / w.sum(), np.zeros(len(w), dtype=bool)
    while (shares > cap * (1 + 1e-12)).any():
        capped |= shares > cap
        free = 1.0 - cap * capped.sum()
        shares = np.where(capped, cap, free * w / w[~capped].sum())
    return shares


def combine(updates: np.ndarray, shares: np.ndarray, robust: str, trim: float) -> np.ndarray:
    """One update from the replies' (n, P) updates: the weighted mean, or the coordinate-wise
    ``trimmed-mean`` (dropping ``floor(trim * n)`` replies at each end of every coordinate) or ``median``
    (both unweighted: a weight would let one reply move the others' order statistics)."""
    if robust == "mean":
        return shares @ updates  # type: ignore[no-any-return]
    if robust == "median":
        return np.median(updates, axis=0)  # type: ignore[no-any-return]
    cut = int(trim * len(updates))
    return np.sort(updates, axis=0)[cut : len(updates) - cut].mean(0)  # type: ignore[no-any-return]


class CrossrecFedAvg(FedAvg):
    """Robust FedAvg of the shared weights; bad replies are dropped with a logged reason.

    A reply's update is its weights minus the global weights of the round (:meth:`configure_train`).
    Each round: replies with bad content are dropped (:func:`reply_problem`); a reply whose update norm
    is above ``fed.outlier`` x the median of the other replies' is dropped; each remaining update is
    clipped to ``fed.clip`` x the median update norm; the updates are combined by ``fed.robust`` with
    weights from ``fed.weighting`` (the examples a client reports, capped at ``fed.max-share`` of the
    round: a client cannot buy the model by inflating its count; or one vote per scenario). Every
    decision is logged and kept in :attr:`decisions` (for the checkpoint's metadata). After each round,
    ``train_metrics`` and ``eval_metrics`` hold the metrics of every accepted reply, by scenario.
    """

    def __init__(self, expected: Expected, fed: FedConfig) -> None:
        super().__init__(
            min_train_nodes=fed.min_clients, min_evaluate_nodes=fed.min_clients, min_available_nodes=fed.min_clients
        )
        self.expected, self.fed = dict(expected), fed
        self.global_arrays: dict[str, np.ndarray] | None = None  # the weights sent this round
        self.train_metrics: dict[str, dict[str, float]] = {}
        self.eval_metrics: dict[str, dict[str, float]] = {}
        self.dropped: list[str] = []
        self.decisions: list[dict[str, object]] = []  # this round's: one row per reply weighed
        self.sent_to: dict[str, int] = {}  # message id -> destination node, set before replies are aggregated
        self.node_scenarios: dict[int, str] = {}  # node id -> scenario, from accepted replies

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg's; keeps the weights sent, against which each reply's update is measured."""
        self.global_arrays = from_arrayrecord(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def source(self, msg: Message) -> str:
        """Who a reply is from: its scenario, else the node it was sent to (the SuperLink answers for a node
        that went offline, under its own id)."""
        node = self.sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        name = scenario_of(msg)
        return self.node_scenarios.get(node, f"node {node}") if name.startswith("node ") else name

    def _drop(self, server_round: int, who: str, problem: str) -> None:
        reason = f"round {server_round}: dropped reply from {who}: {problem}"
        log.warning(reason)
        self.dropped.append(reason)

    def _accept(self, server_round: int, replies: Iterable[Message], expected: Expected | None) -> list[Message]:
        accepted = []
        for msg in replies:
            problem = reply_problem(msg, expected)
            if problem is None:
                accepted.append(msg)
                self.node_scenarios[msg.metadata.src_node_id] = scenario_of(msg)
            else:
                self._drop(server_round, self.source(msg), problem)
        return accepted

    def _outliers(self, server_round: int, names: list[str], norms: np.ndarray) -> np.ndarray:
        """Which replies to keep: those whose update norm is at most ``fed.outlier`` x the median of the
        others' (each dropped one is logged with the figures)."""
        keep = np.ones(len(norms), dtype=bool)
        if not self.fed.outlier or len(norms) < 2:
            return keep
        for i, norm in enumerate(norms):
            others = float(np.median(np.delete(norms, i)))
            if others > 0 and norm > self.fed.outlier * others:  # unchanged weights are no yardstick
                keep[i] = False
                limit = f"fed.outlier = {self.fed.outlier:g} x the others' median {others:.4g}"
                self._drop(server_round, names[i], f"update norm {norm:.4g} is above {limit}")
        return keep

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The robust average of the valid replies (class docstring); None when fewer than
        ``fed.min-clients`` remain."""
        if self.global_arrays is None:
            raise RuntimeError("aggregate_train before configure_train: no global weights to measure updates against")
        sent, keys = self.global_arrays, sorted(self.expected)
        accepted = self._accept(server_round, replies, self.expected)
        updates = np.zeros((len(accepted), sum(sent[k].size for k in keys)))
        for row, msg in enumerate(accepted):
            arrays = from_arrayrecord(msg.content.array_records[ARRAYS])
            updates[row] = np.concatenate([(arrays[k].astype(np.float64) - sent[k]).ravel() for k in keys])
        norms = np.linalg.norm(updates, axis=1)
        keep = self._outliers(server_round, [scenario_of(m) for m in accepted], norms)
        accepted, updates, norms = [m for m, k in zip(accepted, keep, strict=True) if k], updates[keep], norms[keep]
        self.train_metrics = {scenario_of(m): dict(m.content[METRICS]) for m in accepted}  # type: ignore[arg-type]
        if len(accepted) < self.fed.min_clients:
            log.error(
                "round %d: %d valid replies, fed.min-clients = %d", server_round, len(accepted), self.fed.min_clients
            )
            return None, None
        bound = self.fed.clip * float(np.median(norms)) if self.fed.clip else float("inf")
        scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
        claimed = [float(cast(float, m.content.metric_records[METRICS][NUM_EXAMPLES])) for m in accepted]
        if self.fed.weighting == "examples":
            shares = capped_shares(claimed, self.fed.max_share)
        else:
            shares = np.full(len(accepted), 1.0 / len(accepted))
        if self.fed.robust == "trimmed-mean" and int(self.fed.trim * len(accepted)) == 0:
            log.warning(
                "round %d: fed.trim = %g trims nothing from %d replies: an unweighted mean (too few clients)",
                *(server_round, self.fed.trim, len(accepted)),
            )
        step = combine(updates * scale[:, None], shares, self.fed.robust, self.fed.trim)
        self.decisions = []
        for msg, examples, share, norm, factor in zip(accepted, claimed, shares, norms, scale, strict=True):
            decision: dict[str, object] = {"scenario": scenario_of(msg), "examples": examples, "share": float(share)}
            self.decisions.append(decision | {"update_norm": float(norm), "clipped_to": float(norm * factor)})
            clipped = f", clipped to {norm * factor:.4g} (fed.clip = {self.fed.clip:g} x median)" if factor < 1 else ""
            (log.warning if clipped else log.info)(
                "round %d: %s update norm %.4g%s, share %.3f (%g examples claimed), combined by %s",
                *(server_round, decision["scenario"], norm, clipped, share, examples, self.fed.robust),
            )
        average, at = {}, 0
        for k in keys:
            new = sent[k].astype(np.float64) + step[at : at + sent[k].size].reshape(sent[k].shape)
            average[k], at = new.astype(sent[k].dtype), at + sent[k].size
        return to_arrayrecord(average), MetricRecord(_mean(self.train_metrics.values()))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each scenario's metrics; return their macro average."""
        accepted = self._accept(server_round, replies, None)
        self.eval_metrics = {scenario_of(m): dict(m.content[METRICS]) for m in accepted}  # type: ignore[arg-type]
        return MetricRecord(_mean(self.eval_metrics.values())) if accepted else None


def _mean(rows: Iterable[Mapping[str, float]]) -> dict[str, int | float | list[int] | list[float]]:
    rows = list(rows)
    keys = set.intersection(*(set(r) for r in rows)) if rows else set()
    return {k: float(np.mean([r[k] for r in rows])) for k in sorted(keys)}
