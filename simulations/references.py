"""Reference points trained or scored in-process on the same splits as the federation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from client.evaluation import evaluate, popularity_metrics
from client.training import LocalData, build_model, train_round
from shared.config import Config

Row = dict[str, Any]


def split_metrics(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"valid.ndcg@10": x}`` -> ``{"valid": {"ndcg@10": x}}``."""
    out: dict[str, dict[str, float]] = {"valid": {}, "test": {}}
    for key, value in flat.items():
        split, name = key.split(".", 1)
        out[split][name] = value
    return out


def popularity_rows(datasets: Iterable[LocalData]) -> list[Row]:
    return [
        {"round": 0, "scenario": d.scenario.name, "reference": "popularity", **split_metrics(popularity_metrics(d))}
        for d in datasets
    ]


def local_rows(cfg: Config, data: LocalData, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """One scenario alone: the same model, initial weights, rounds and steps as a federated client."""
    model = build_model(cfg, data)  # same seed as the server's initial weights
    rows: list[Row] = []
    for server_round in range(1, cfg.fed.rounds + 1):
        stats = train_round(model, data, cfg, server_round)
        row: Row = {
            "round": server_round,
            "scenario": data.scenario.name,
            "reference": "local",
            "train": stats,
            **split_metrics(evaluate(model, data, cfg)),
        }
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def select_rounds(rows: list[Row], metric: str = "ndcg@10") -> dict[str, Row]:
    """Per scenario, the row of the round with the best *validation* metric (earliest on ties).

    Federated rows are one global model, so their round is chosen on the macro average over
    scenarios; local rows are separate models, chosen per scenario.
    """
    chosen: dict[str, Row] = {}
    by_round: dict[int, list[Row]] = {}
    for row in rows:
        by_round.setdefault(int(row["round"]), []).append(row)
    if rows and rows[0]["reference"] == "federated":
        best = max(sorted(by_round), key=lambda r: sum(x["valid"][metric] for x in by_round[r]) / len(by_round[r]))
        return {str(x["scenario"]): x for x in by_round[best]}
    for row in sorted(rows, key=lambda x: int(x["round"])):
        name = str(row["scenario"])
        if name not in chosen or row["valid"][metric] > chosen[name]["valid"][metric]:
            chosen[name] = row
    return chosen
