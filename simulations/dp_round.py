"""What one private round costs, and why: one local round (``train.local-steps`` steps) on one scenario with
the benchmark's run config (no ID embeddings: DP-SGD cannot train them), in several settings side by side,
each scored on validation and test (NDCG@10 / AUC) with paired 95 % intervals against the plain round.

Settings: ``plain`` (the federation's local round), ``dp`` (DP-SGD at ``privacy.epsilon``, default 8,
planned over the benchmark's ``fed.rounds`` x ``train.local-steps``), ``noise0`` (the same with noise
multiplier 0: clipping and Poisson sampling only), ``private-batches`` (the private path's batches and
frozen parts with a plain optimiser step: no clipping, no noise).

    python -m simulations.dp_round --data runs/benchmark-latest/data --scenario ecommerce \\
        --settings plain,dp,noise0,private-batches [--run-config "train.fresh-items=0"] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from client.evaluation import PerUser, evaluate
from client.privacy import DPSGD, plan
from client.training import LocalData, build_model, prepare, train_round
from shared.config import Config
from shared.data import load_scenario
from shared.metrics import paired_bootstrap

from .benchmark import DEFAULT_RUN_CONFIG
from .simulate import parse_overrides

SETTINGS = ("plain", "dp", "noise0", "private-batches")


class PlainStep(DPSGD):
    """The private path (Poisson users, per-user fresh items, catalog parts held) with a plain optimiser step."""

    def __init__(self) -> None:  # no ledger: nothing is spent
        pass

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[Any]:
        yield optimizer

    @staticmethod
    def step(optimizer: Any, model: torch.nn.Module) -> None:
        optimizer.step()

    @staticmethod
    def empty_batch(params: list[torch.nn.Parameter]) -> None:
        pass


def one_round(cfg: Config, data: LocalData, setting: str) -> tuple[dict[str, float], PerUser]:
    """Train one local round in ``setting`` from the initial weights; its metrics and per-user values."""
    private = setting in ("dp", "noise0")
    epsilon = (cfg.privacy.epsilon or 8.0) if private else 0.0
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, epsilon=epsilon))
    model = build_model(cfg, data)
    privacy: DPSGD | None = None
    if private:
        ledger = plan(cfg, data.scenario.name, len(data.scenario.users), len(data.trainable_users))
        if setting == "noise0":
            ledger = dataclasses.replace(ledger, noise_multiplier=0.0)
        privacy = DPSGD(ledger, len(data.trainable_users))
    elif setting == "private-batches":
        privacy = PlainStep()
    started = time.time()
    stats = train_round(model, data, cfg, 1, privacy)
    seconds = time.time() - started
    per_user: PerUser = {}
    metrics = evaluate(model, data, cfg, per_user=per_user)
    return {**metrics, **{f"train.{k}": v for k, v in stats.items()}, "seconds": seconds}, per_user


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of canonical scenario folders")
    parser.add_argument("--scenario", required=True, help="the scenario folder's name inside --data")
    parser.add_argument("--settings", default="plain,dp,noise0,private-batches", help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--run-config", default="", help="overrides of the benchmark's run config")
    parser.add_argument("--out", default="runs/dp-round", help="folder for dp_round.json")
    args = parser.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or "plain" not in settings:
        parser.error(f"--settings {args.settings!r}: known {', '.join(SETTINGS)}, and plain must be one of them")
    flat = {**DEFAULT_RUN_CONFIG, "model.item-ids": False, **parse_overrides(args.run_config)}
    cfg = Config.from_run_config(Config().to_flat() | flat)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"run_config": flat, "scenario": args.scenario, "settings": {}}
    values: dict[str, PerUser] = {}
    data = prepare(load_scenario(Path(args.data) / args.scenario), cfg)  # the same users for every setting
    for setting in settings:
        metrics, values[setting] = one_round(cfg, data, setting)
        results["settings"][setting] = metrics
        (out / "dp_round.json").write_text(json.dumps(results, indent=1) + "\n")  # keep what is done
    metric = "auc" if "valid.auc" in results["settings"]["plain"] else "ndcg@10"
    print(f"| setting | valid {metric} | test {metric} | test - plain (95 %) | seconds |")
    print("|---|---:|---:|---:|---:|")
    for setting, metrics in results["settings"].items():
        paired = paired_bootstrap(values[setting][f"test.{metric}"], values["plain"][f"test.{metric}"])
        metrics["test_minus_plain"] = paired
        interval = f"{paired['diff']:+.4f} [{paired['lo']:+.4f}, {paired['hi']:+.4f}]"
        print(
            f"| {setting} | {metrics[f'valid.{metric}']:.4f} | {metrics[f'test.{metric}']:.4f} | "
            f"{interval if setting != 'plain' else '-'} | {metrics['seconds']:.0f} |"
        )
    (out / "dp_round.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"wrote {out / 'dp_round.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
