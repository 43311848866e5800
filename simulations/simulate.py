"""The main job: a local federated simulation (one SuperNode per scenario) plus its reference points.

1. writes the demo federation (or uses ``--data``) in the canonical format;
2. starts a simulation SuperLink on loopback and submits the crossrec app with ``flwr run``
   (the ServerApp writes ``metrics.jsonl``, a checkpoint per round and the final adapter);
3. trains/scores the ``popularity`` and ``local`` references in-process on the same splits;
4. writes ``summary.json``, ``report.md``, ``plots/`` and points ``runs/latest`` at the run folder.
Every process it starts is stopped before it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.evaluation import frozen_table
from client.training import LocalData, prepare
from server.launch import flwr_run, simulation_superlink
from server.rounds import METRICS_FILE
from shared.checkpoint import latest_checkpoint
from shared.config import Config
from shared.data import load_scenario
from shared.demo import write_demo_federation
from shared.metrics import select_rounds

from .references import local_rows, popularity_rows
from .report import paired_table, results_table, write_outputs

log = logging.getLogger(__name__)
APP_DIR = Path(__file__).resolve().parents[1]
CACHE = "cache"  # RUN/cache: the run's frozen prefixes and text tables (run.cache-dir), removed at the end


@contextlib.contextmanager
def run_cache(run_dir: Path, cfg: Config) -> Iterator[None]:
    """The run's own encoding cache (``RUN/cache``, set by the run's launcher) is removed when the block ends
    (about 1 GB of frozen prefixes for the benchmark's public scenarios); a ``run.cache-dir`` the user passed
    is theirs and stays."""
    try:
        yield
    finally:
        if Path(cfg.run.cache_dir) == run_dir / CACHE:
            shutil.rmtree(run_dir / CACHE, ignore_errors=True)


def with_threads(cfg: Config, threads: int) -> Config:
    """``cfg`` with ``train.threads`` set."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=threads))


def parse_overrides(text: str) -> dict[str, bool | int | float | str]:
    """``"train.lr=0.01 data.scenarios='shop,news'"`` -> typed values (TOML syntax, bare words as strings)."""
    out: dict[str, bool | int | float | str] = {}
    for item in shlex.split(text or ""):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--run-config item {item!r} is not key=value")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def simulate(run_config: str = "", data: str | None = None, runs_dir: str = "runs", demo_seed: int = 0) -> Path:
    """Run the main job; returns the run folder."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise RuntimeError(
            f"the Flower app is not at {APP_DIR}: install crossrec from a source checkout (pip install -e .)"
        )
    started = time.time()
    run_dir = (Path(runs_dir) / time.strftime("%Y%m%d-%H%M%S")).resolve()
    data_dir = run_dir / "data" if data is None else Path(data).resolve()
    overrides = {
        "run.cache-dir": str(run_dir / CACHE),
        **parse_overrides(run_config),
        "data.dir": str(data_dir),
        "run.dir": str(run_dir),
    }
    cfg = Config.from_run_config({**Config().to_flat(), **overrides})  # validate before anything is written
    datasets = None if data is None else load_datasets(data_dir, cfg)  # a user's data: checked first, too
    run_dir.mkdir(parents=True, exist_ok=False)
    if datasets is None:
        write_demo_federation(data_dir, seed=demo_seed)
        datasets = load_datasets(data_dir, cfg)
    log.info("run folder %s", run_dir)

    timings: dict[str, float] = {}
    federated: list[tuple[list[dict[str, Any]], Path]] = []
    failures: list[BaseException] = []

    def run_federated() -> None:  # Flower's processes: the in-process references run beside them
        t0 = time.time()
        try:
            federated.append(federated_rows(run_dir, overrides, len(datasets), cfg.fed.rounds))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
            failures.append(exc)
        timings["federated"] = time.time() - t0

    # beside the simulation's one-thread clients the references get one thread (all cores oversubscribe)
    beside = with_threads(cfg, cfg.train.threads or 1)
    federation = threading.Thread(target=run_federated, name="federated")
    with run_cache(run_dir, cfg):
        federation.start()
        try:
            t0 = time.time()
            local = []
            for d in datasets:

                def show(row: dict[str, Any]) -> None:
                    log.info(
                        "local %s round %d/%d: valid ndcg@10 %.4f",
                        *(row["scenario"], row["round"], cfg.fed.rounds, row["valid"]["ndcg@10"]),
                    )

                log.info("local reference for %s", d.scenario.name)
                local += local_rows(beside, d, show, run_dir / "local")
                if failures:
                    break
            timings["local"] = time.time() - t0
            t0 = time.time()
            tables = {d.scenario.name: frozen_table(cfg, d.scenario.texts) for d in datasets}
            pop = popularity_rows(datasets, tables, run_dir / "popularity")
            timings["popularity"] = time.time() - t0
        finally:
            federation.join()
    if failures:
        raise failures[0]
    rows, final = federated[0]
    folders = {"federated": run_dir, "popularity": run_dir / "popularity", "local": run_dir / "local"}
    with (run_dir / METRICS_FILE).open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in pop + local)

    selected = {
        "popularity": {str(r["scenario"]): r for r in pop},
        "local": select_rounds(local),
        "federated": select_rounds([r for r in rows if r["reference"] == "federated"]),
    }
    timings["total"] = time.time() - started
    notes = [f"final checkpoint: {final.relative_to(run_dir)}; peft adapter: adapter/"]
    result = write_outputs(run_dir, rows + pop + local, selected, timings, notes, folders=folders)
    latest = Path(runs_dir).resolve() / "latest"
    tmp_link = latest.with_name(".latest-tmp")
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(run_dir.name)
    os.replace(tmp_link, latest)
    print_table(result)
    for line in paired_table(result.get("paired", {})):
        print(line)
    print(f"crossrec: done in {timings['total']:.0f}s; outputs in {latest} -> {run_dir.name}")
    return run_dir


def load_datasets(data_dir: Path, cfg: Config) -> list[LocalData]:
    """The scenarios of ``data.scenarios`` from ``data_dir``, validated and split; logs their sizes."""
    datasets = [
        prepare(load_scenario(data_dir / name, lenient=cfg.data.lenient), cfg) for name in cfg.data.scenario_names
    ]
    for d in datasets:
        impressions = d.scenario.impressions
        evaluated = (
            f"{len(d.split.eval_users)} evaluated users"
            if impressions is None
            else f"{len(impressions.impression_ids)} impressions ({len(d.split.valid_impressions)} validation, "
            f"{len(d.split.test_impressions)} test)"
        )
        log.info(
            "scenario %s: %d items, %d users, %d interactions (ordered by %s), %s",
            *(d.scenario.name, d.scenario.num_items, len(d.scenario.users), d.scenario.num_interactions),
            *(d.scenario.order, evaluated),
        )
        for reason, count in d.scenario.skipped.items():
            log.warning("scenario %s: skipped %d rows: %s", d.scenario.name, count, reason)
    return datasets


def federated_rows(
    run_dir: Path, overrides: dict[str, bool | int | float | str], num_scenarios: int, rounds: int
) -> tuple[list[dict[str, Any]], Path]:
    """The real Flower simulation (one SuperNode per scenario) writing into ``run_dir``; returns its
    metrics rows and final checkpoint. The SuperLink and everything below it are stopped on return."""
    log.info("federated simulation, %d SuperNodes, %d rounds", num_scenarios, rounds)
    run_dir.mkdir(parents=True, exist_ok=True)
    flower = {**overrides, "run.dir": str(run_dir), "train.threads": 1}  # one thread per simulated client
    with simulation_superlink(run_dir / ".flwr", run_dir / "superlink.log"):
        code = flwr_run(APP_DIR, run_dir / ".flwr", flower, num_supernodes=num_scenarios)
    final = latest_checkpoint(run_dir)
    if code != 0 or final is None or final.name != f"round-{rounds:04d}":
        raise RuntimeError(f"the federated run did not finish (flwr run exit code {code}); see {run_dir}/superlink.log")
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()], final


def print_table(result: dict[str, Any]) -> None:
    """The test metrics as a plain-text table (one block per set of metrics)."""
    print()
    for line in results_table(result):
        print(line)
