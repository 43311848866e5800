"""FedAvg over the trainable weights that validates every reply and keeps per-scenario metrics."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from shared.records import (
    ARRAYS,
    INFO,
    METRICS,
    NUM_EXAMPLES,
    from_arrayrecord,
    to_arrayrecord,
    validate_arrays,
    weighted_average,
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


class CrossrecFedAvg(FedAvg):
    """Weighted FedAvg of adapters, user model and head; bad replies are dropped with a logged reason.

    ``weighting="examples"`` weights each scenario by its training examples, ``"uniform"`` gives
    every scenario one vote. After each round, ``train_metrics`` and ``eval_metrics`` hold the
    metrics of every accepted reply, by scenario.
    """

    def __init__(self, expected: Expected, *, weighting: str, min_clients: int) -> None:
        super().__init__(min_train_nodes=min_clients, min_evaluate_nodes=min_clients, min_available_nodes=min_clients)
        self.expected, self.weighting, self.min_clients = dict(expected), weighting, min_clients
        self.train_metrics: dict[str, dict[str, float]] = {}
        self.eval_metrics: dict[str, dict[str, float]] = {}
        self.dropped: list[str] = []
        self.sent_to: dict[str, int] = {}  # message id -> destination node, set before replies are aggregated
        self.node_scenarios: dict[int, str] = {}  # node id -> scenario, from accepted replies

    def source(self, msg: Message) -> str:
        """Who a reply is from: its scenario, else the node it was sent to (the SuperLink answers for a node
        that went offline, under its own id)."""
        node = self.sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        name = scenario_of(msg)
        return self.node_scenarios.get(node, f"node {node}") if name.startswith("node ") else name

    def _accept(self, server_round: int, replies: Iterable[Message], expected: Expected | None) -> list[Message]:
        accepted = []
        for msg in replies:
            problem = reply_problem(msg, expected)
            if problem is None:
                accepted.append(msg)
                self.node_scenarios[msg.metadata.src_node_id] = scenario_of(msg)
            else:
                reason = f"round {server_round}: dropped reply from {self.source(msg)}: {problem}"
                log.warning(reason)
                self.dropped.append(reason)
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid replies; None when fewer than ``min_clients`` are valid."""
        accepted = self._accept(server_round, replies, self.expected)
        self.train_metrics = {scenario_of(m): dict(m.content[METRICS]) for m in accepted}  # type: ignore[arg-type]
        if len(accepted) < self.min_clients:
            log.error("round %d: %d valid replies, fed.min-clients = %d", server_round, len(accepted), self.min_clients)
            return None, None
        states = [from_arrayrecord(m.content.array_records[ARRAYS]) for m in accepted]
        weights = [
            float(cast(float, m.content.metric_records[METRICS][NUM_EXAMPLES])) if self.weighting == "examples" else 1.0
            for m in accepted
        ]
        average = weighted_average(states, weights)
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
