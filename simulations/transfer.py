"""Transfer to a scenario that took no part in training: leave one scenario out.

For each scenario H of ``--scenarios``: the real Flower simulation on the other scenarios (the benchmark's
run config), then every round's global checkpoint evaluated on H as a newcomer would use it: shared weights
only, no private memory (H has none: its items are scored from their text), against the frozen encoder's
zero-shot on the same test users. The paired difference of the test primary metric (NDCG@10; news: AUC)
has a 95 % bootstrap interval. The checkpoint a newcomer gets is the round the federation selects on its
own scenarios' validation splits (as the benchmark selects a global model); every round is reported too.
Writes ``RUN/transfer.json`` and ``RUN/report.md`` (``RUN`` = ``RUNS/transfer-<timestamp>``), prints the table.

    .venv/bin/python -m simulations.transfer
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

from client.evaluation import evaluate, frozen_table, load_per_user, per_user_file
from client.training import LocalData, build_model
from server.launch import stop_children_on_signal
from shared.checkpoint import checkpoint_dir, load_checkpoint
from shared.config import Config
from shared.files import atomic_write_text
from shared.metrics import paired_bootstrap, primary_metric, select_rounds
from shared.records import load_trainable

from .benchmark import DEFAULT_SCENARIOS, convert, parse_sources, plan_run
from .references import Row, evaluated, zero_shot_rows
from .report import verdict
from .simulate import federated_rows, load_datasets, run_cache

log = logging.getLogger(__name__)


def newcomer_rows(cfg: Config, data: LocalData, fed_dir: Path, rounds: int, folder: Path) -> list[Row]:
    """Every round's global checkpoint of the run in ``fed_dir`` evaluated on ``data``, a scenario it was
    not trained on: shared weights loaded, the item memory left at zero (text alone)."""
    model = build_model(cfg, data)
    vectors = frozen_table(cfg, data.scenario.texts)
    rows: list[Row] = []
    for server_round in range(1, rounds + 1):
        _, weights, _ = load_checkpoint(checkpoint_dir(fed_dir, server_round), cfg)
        load_trainable(model, weights)
        measure = functools.partial(evaluate, model, data, cfg, None, vectors)
        split = evaluated(folder, data, server_round, measure)
        rows.append({"round": server_round, "scenario": data.scenario.name, "reference": "transfer", **split})
    return rows


def held_out(
    cfg: Config, overrides: dict[str, Any], datasets: list[LocalData], out: LocalData, run_dir: Path
) -> dict[str, Any]:
    """Train on every scenario but ``out`` (Flower simulation), evaluate each round on ``out``."""
    name = out.scenario.name
    others = [d.scenario.name for d in datasets if d is not out]
    folder = run_dir / f"without-{name}"
    started = time.time()
    fed, _ = federated_rows(
        folder / "federated",
        {**overrides, "data.scenarios": ",".join(others), "fed.min-clients": len(others)},
        len(others),
        cfg.fed.rounds,
    )
    trained = time.time() - started
    shipped = int(next(iter(select_rounds(fed).values()))["round"])
    (zero,), _ = zero_shot_rows(cfg, [out], folder / "zero_shot")
    rows = newcomer_rows(cfg, out, folder / "federated", cfg.fed.rounds, folder / "transfer")
    metric = primary_metric(zero)
    base = load_per_user(per_user_file(folder / "zero_shot", name, 0))[f"test.{metric}"]
    paired = {
        row["round"]: paired_bootstrap(
            load_per_user(per_user_file(folder / "transfer", name, row["round"]))[f"test.{metric}"], base
        )
        for row in rows
    }
    return {
        "held_out": name,
        "trained_on": others,
        "metric": metric,
        "zero_shot": {"valid": zero["valid"][metric], "test": zero["test"][metric]},
        "rounds": {
            str(r["round"]): {"valid": r["valid"][metric], "test": r["test"][metric], "paired": paired[r["round"]]}
            for r in rows
        },
        "shipped_round": shipped,
        "federation_valid": {str(r["scenario"]) + f"@{r['round']}": r["valid"][primary_metric(r)] for r in fed},
        "train_seconds": trained,
        "seconds": time.time() - started,
    }


def table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown: per held-out scenario, zero-shot, every round, and the shipped round's paired difference."""
    rounds = max(len(r["rounds"]) for r in results)
    lines = [
        "| held out | trained on | metric | zero-shot | "
        + " | ".join(f"round {i}" for i in range(1, rounds + 1))
        + " | shipped round | shipped - zero-shot | 95 % interval | verdict |",
        "|---|---|---|---:|" + "---:|" * rounds + "---:|---:|---|---|",
    ]
    for r in results:
        p = r["rounds"][str(r["shipped_round"])]["paired"]
        lines.append(
            f"| {r['held_out']} | {', '.join(r['trained_on'])} | {r['metric']} | {r['zero_shot']['test']:.4f} | "
            + " | ".join(f"{r['rounds'][str(i)]['test']:.4f}" for i in range(1, rounds + 1))
            + f" | {r['shipped_round']} | {p['diff']:+.4f} | [{p['lo']:+.4f}, {p['hi']:+.4f}] | {verdict(p)} |"
        )
    return lines


def transfer(
    data: str | Path | None = None,
    scenarios: str = DEFAULT_SCENARIOS,
    run_config: str = "",
    runs_dir: str | Path = "runs",
    held: str = "",
) -> Path:
    """Leave-one-scenario-out transfer (module docstring); returns the run folder."""
    sources = parse_sources(scenarios)
    if len(sources) < 2:
        raise ValueError(f"--scenarios {scenarios!r}: leave-one-out needs at least two scenarios")
    names = [s.name for s in sources]
    chosen = [x.strip() for x in held.split(",") if x.strip()] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(f"--held-out {held!r}: {unknown} not among --scenarios {scenarios!r}")
    data_root, run_dir, overrides, cfg = plan_run("transfer", data, sources, run_config, runs_dir)
    run_dir.mkdir(parents=True, exist_ok=False)
    convert(sources, data_root, run_dir / "data", lenient=cfg.data.lenient)
    datasets = load_datasets(run_dir / "data", cfg)
    results = []
    with run_cache(run_dir, cfg):
        for out in (d for d in datasets if d.scenario.name in chosen):
            log.info("held out: %s (training on the others)", out.scenario.name)
            results.append(held_out(cfg, overrides, datasets, out, run_dir))
            text = json.dumps({"overrides": overrides, "results": results}, indent=2)
            atomic_write_text(run_dir / "transfer.json", text)
    lines = table(results)
    config = " ".join(f"{k}={v}" for k, v in overrides.items() if k not in ("data.dir", "run.cache-dir"))
    report = [
        "# Transfer to a scenario that took no part in training",
        "",
        f"Run config: `{config}`. Test split; paired over the held-out scenario's test users (news: impressions).",
        "",
        *lines,
    ]
    atomic_write_text(run_dir / "report.md", "\n".join(report) + "\n")
    print("\n".join(lines))
    return run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="benchmark data directory (default: ../shared/data)")
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS)
    parser.add_argument("--held-out", default="", help="which scenarios to hold out (default: each in turn)")
    parser.add_argument("--run-config", default="", help='overrides of the benchmark defaults, e.g. "fed.rounds=2"')
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        with stop_children_on_signal():  # Ctrl-C / SIGTERM: the Flower processes below go first
            transfer(args.data, args.scenarios, args.run_config, args.runs_dir, args.held_out)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"crossrec transfer: {exc}\n")


if __name__ == "__main__":
    main()
