"""The server's round loop: train, validate + aggregate, evaluate, log, checkpoint; resumable."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from shared.checkpoint import chosen_checkpoint, export_adapter, load_checkpoint, save_checkpoint
from shared.config import Config
from shared.model import RecModel
from shared.records import PRIVACY_SPENT, from_arrayrecord, load_trainable, to_arrayrecord, trainable_state

from .strategy import CrossrecFedAvg, expected_from

log = logging.getLogger("flwr").getChild("crossrec")  # streamed by `flwr run --stream`
METRICS_FILE = "metrics.jsonl"


def initial_weights(cfg: Config) -> tuple[int, dict[str, np.ndarray], RecModel]:
    """(last completed round, weights, model): from ``run.resume`` or freshly seeded."""
    torch.manual_seed(cfg.train.seed)
    model = RecModel(cfg)
    if cfg.run.resume:
        done, arrays, _ = load_checkpoint(cfg.run.resume, cfg)
        load_trainable(model, arrays)
        log.info("resuming after round %d from %s", done, cfg.run.resume)
        return done, arrays, model
    return 0, trainable_state(model), model


def metric_lines(server_round: int, strategy: CrossrecFedAvg, reference: str = "federated") -> list[dict[str, Any]]:
    """One metrics.jsonl row per scenario: train stats and valid/test metrics of this round."""
    rows = []
    for scenario in sorted(set(strategy.train_metrics) | set(strategy.eval_metrics)):
        ev = strategy.eval_metrics.get(scenario, {})
        rows.append(
            {
                "round": server_round,
                "scenario": scenario,
                "reference": reference,
                "train": strategy.train_metrics.get(scenario, {}),
                **{
                    split: {k.split(".", 1)[1]: v for k, v in ev.items() if k.startswith(split + ".")}
                    for split in ("valid", "test")
                },
            }
        )
    return rows


PULL_INTERVAL = 0.5  # seconds between two pulls of the replies still missing
PULL_RETRIES = 5  # consecutive failed pulls (SuperLink errors 5xx) tolerated before the round fails


def exchange(grid: Grid, strategy: CrossrecFedAvg, messages: Iterable[Message], cfg: Config) -> list[Message]:
    """Send, wait up to ``fed.timeout`` for the replies, and tell the strategy where each message went.

    Like ``Grid.send_and_receive``, but polls every ``PULL_INTERVAL`` s (not 3 s) and rides out a few
    consecutive server errors of the SuperLink (each logged) instead of losing the whole run to one."""
    sent = list(messages)
    pending = {i for i in grid.push_messages(sent) if i}
    strategy.sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}  # ids are set when sent
    deadline, failures, replies = time.monotonic() + cfg.fed.timeout, 0, []
    while pending and time.monotonic() < deadline:
        try:
            got = list(grid.pull_messages(pending))
            failures = 0
        except httpx.HTTPStatusError as exc:
            failures += 1
            if exc.response.status_code < 500 or failures > PULL_RETRIES:
                raise
            log.warning("pulling replies failed (%s); retry %d of %d", exc, failures, PULL_RETRIES)
            time.sleep(PULL_INTERVAL * 2**failures)
            continue
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(PULL_INTERVAL)
    return replies


def run_federation(grid: Grid, cfg: Config, run_dir: Path) -> dict[str, np.ndarray]:
    """Run rounds ``done+1 .. fed.rounds``; checkpoint after each; export the adapter of the round chosen on
    validation; returns the final weights."""
    run_dir.mkdir(parents=True, exist_ok=True)
    done, arrays, model = initial_weights(cfg)
    strategy = CrossrecFedAvg(expected_from(arrays), cfg.fed)
    global_record = to_arrayrecord(arrays)
    spent = load_checkpoint(cfg.run.resume, cfg)[2].get("privacy", {}) if cfg.run.resume else {}
    for server_round in range(done + 1, cfg.fed.rounds + 1):
        started = time.time()
        log.info("[ROUND %d/%d] training", server_round, cfg.fed.rounds)
        config = ConfigRecord({PRIVACY_SPENT: json.dumps(spent)})  # a client's ledger must not be behind it
        messages = strategy.configure_train(server_round, global_record, config, grid)
        replies = exchange(grid, strategy, messages, cfg)
        new_record, _ = strategy.aggregate_train(server_round, replies)
        if new_record is None:
            raise RuntimeError(
                f"round {server_round} failed: fewer than fed.min-clients = {cfg.fed.min_clients} valid replies "
                f"({'; '.join(strategy.dropped[-3:]) or 'no replies'}); the last checkpoint is intact, resume from it"
            )
        global_record = new_record
        messages = strategy.configure_evaluate(server_round, global_record, ConfigRecord(), grid)
        replies = exchange(grid, strategy, messages, cfg)
        strategy.aggregate_evaluate(server_round, replies)
        rows = metric_lines(server_round, strategy)
        for row in rows:  # what each private client reported spent, kept for the scenarios that skip a round
            if "privacy.epsilon" in row["train"]:
                epsilon, delta = row["train"]["privacy.epsilon"], row["train"]["privacy.delta"]
                old = spent.get(row["scenario"], {}).get("epsilon", 0.0)
                spent[row["scenario"]] = {"epsilon": max(epsilon, old), "delta": delta}
        with (run_dir / METRICS_FILE).open("a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
        save_checkpoint(
            run_dir,
            server_round,
            from_arrayrecord(global_record),
            cfg,
            {
                "metrics": {r["scenario"]: {"valid": r["valid"], "test": r["test"]} for r in rows},
                "privacy": spent,  # epsilon spent so far by each private scenario, as its client reported it
                "dropped": strategy.dropped,
                "seconds": round(time.time() - started, 3),  # the round's wall time: training, aggregation, evaluation
                "aggregation": strategy.decisions,  # per reply: claimed examples, share, update norm, clipped norm
            },
        )
        summary = ", ".join(f"{r['scenario']} ndcg@10 {r['valid'].get('ndcg@10', float('nan')):.4f}" for r in rows)
        log.info("[ROUND %d/%d] done in %.1fs: valid %s", server_round, cfg.fed.rounds, time.time() - started, summary)
    final = from_arrayrecord(global_record)
    chosen = chosen_checkpoint(run_dir)  # the adapter is the round chosen on validation, like a run folder
    if chosen is not None:
        server_round, arrays, _ = load_checkpoint(chosen, cfg)
        load_trainable(model, arrays)
        export_adapter(model, run_dir / "adapter", server_round)
        log.info("exported the adapter of round %d (chosen on validation) to %s", server_round, run_dir / "adapter")
    return final
