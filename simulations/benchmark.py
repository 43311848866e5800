"""The benchmark: real public scenarios, every reference point on the same splits.

1. converts each public dataset (MovieLens, Amazon in UniSRec format, MIND) into a canonical scenario
   folder under ``RUN/data/`` with its validating loader (nothing is written into the data directory);
2. runs the references: ``federated`` (the real Flower simulation, one SuperNode per scenario, as in
   :mod:`simulations.simulate`), ``federated-epsX`` for each ``--epsilons`` value (the same with
   ``privacy.epsilon=X`` and no ID embeddings), ``zero_shot``, ``popularity``, ``local`` and ``centralized``
   (:mod:`simulations.references`);
3. selects rounds on validation only, writes ``summary.json`` (``scenarios.NAME.REFERENCE.METRIC``, test
   split, plus ``wall_seconds`` per reference), ``report.md``, ``plots/*.png`` and ``metrics.jsonl``, and
   points ``RUNS/benchmark-latest`` at the run folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from shared.config import Config
from shared.data import write_scenario
from shared.files import atomic_write_text
from shared.loaders import PUBLIC_FORMATS, load_public
from shared.metrics import select_rounds

from .references import Row, centralized_rows, local_rows, popularity_rows, zero_shot_rows
from .report import by_target_popularity, paired_intervals, paired_table, summary, verdict, write_outputs
from .sasrec import SASRecSettings, sasrec_rows
from .simulate import (
    APP_DIR,
    CACHE,
    federated_rows,
    load_datasets,
    parse_overrides,
    print_table,
    run_cache,
    with_threads,
)

DEFAULT_DATA = APP_DIR.parent / "shared" / "data"


@dataclass(frozen=True)
class Source:
    """One benchmark scenario: its name, public format and folder relative to the data directory."""

    name: str
    fmt: str
    path: str


KNOWN = {
    "movies": Source("movies", "movielens", "movies/ml-latest-small"),
    "ml-100k": Source("ml-100k", "ml-100k", "movies/ml-100k"),
    "ecommerce": Source("ecommerce", "amazon", "ecommerce/amazon-scientific"),
    "news": Source("news", "mind", "news/mind-small-sample"),
}
DEFAULT_SCENARIOS = "movies,ecommerce,news"
# Chosen so that the whole default benchmark (five references, three scenarios) fits in an hour on 2 CPU cores.
DEFAULT_RUN_CONFIG: dict[str, bool | int | float | str] = {
    "model.max-length": 32,
    "model.history": 20,
    "model.head-hidden": 32,
    "fed.rounds": 3,
    "train.local-steps": 300,
    "train.fresh-every": 10,
    # catalogs above 5,000 items (MovieLens 9,724, the MIND sample 6,334) rank each position against 5,000
    # uniform negatives: MovieLens's full softmax was the federation's long pole; Amazon (4,385) keeps the
    # full softmax, where 2,048 negatives cost validation NDCG@10 (BENCHMARKS.md, ninth run)
    "train.negatives": 5000,
    # private ID embeddings on the sequence encoder's input for the catalogs with recurring items; MIND's
    # candidates are fresh articles, text only (BENCHMARKS.md, eleventh run: Amazon test +0.0051, news level)
    "model.item-ids": True,
    "model.text-only": "news",
}
# SASRec settings chosen on each scenario's validation split (defaults: Amazon); MovieLens has 610 users,
# so 256-user batches give 3 steps an epoch: 32-user batches and dropout 0.2 did best there
SASREC_SETTINGS = {"movies": SASRecSettings(batch_size=32, dropout=0.2)}
REFERENCES = ("federated", "zero_shot", "popularity", "local", "centralized", "sasrec")

# Published figures on the same data and protocol (see BENCHMARKS.md).
GOALS = (
    ("ecommerce", "federated", "ndcg@10", 0.0643, "VQ-Rec NDCG@10"),
    ("ecommerce", "federated", "hr@10", 0.1211, "VQ-Rec Recall@10"),
    ("news", "federated", "auc", 0.668, "NAML AUC (full MIND-small)"),
)
# private federation at epsilon -> share of the non-private federation's primary metric to keep
PRIVATE_GOALS = {8.0: 0.90, 4.0: 0.80}


def parse_sources(text: str) -> list[Source]:
    """``"movies,ecommerce,news"`` (known names) or ``NAME=FORMAT:PATH`` items (PATH relative to the data dir)."""
    sources = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if "=" in item:
            name, _, spec = item.partition("=")
            fmt, sep, path = spec.partition(":")
            if not sep or fmt not in PUBLIC_FORMATS:
                raise ValueError(
                    f"scenario {item!r}: expected NAME=FORMAT:PATH with FORMAT in {', '.join(PUBLIC_FORMATS)}"
                )
            sources.append(Source(name, fmt, path))
        elif item in KNOWN:
            sources.append(KNOWN[item])
        else:
            raise ValueError(f"unknown scenario {item!r}: use one of {', '.join(KNOWN)} or NAME=FORMAT:PATH")
    if not sources or len({s.name for s in sources}) != len(sources):
        raise ValueError(f"scenarios {text!r}: need at least one, with distinct names")
    return sources


def convert(sources: Sequence[Source], data_root: Path, data_dir: Path, lenient: bool = False) -> None:
    """Each public dataset as a canonical scenario folder ``data_dir/NAME`` (the data directory is only read)."""
    for src in sources:
        scenario, stamps = load_public(src.fmt, data_root / src.path, name=src.name, lenient=lenient)
        write_scenario(data_dir / src.name, scenario, stamps)


def plan_run(
    kind: str,
    data: str | os.PathLike[str] | None,
    sources: Sequence[Source],
    run_config: str,
    runs_dir: str | os.PathLike[str],
) -> tuple[Path, Path, dict[str, bool | int | float | str], Config]:
    """The public data folder, a new run folder ``RUNS/KIND-TIMESTAMP`` (not created yet), the run-config
    overrides (the benchmark's defaults, then ``run_config``, then this run's converted data and all its
    scenarios as clients) and the config they give, validated: nothing is written before it is."""
    data_root = Path(data) if data is not None else DEFAULT_DATA
    if not data_root.is_dir():
        raise FileNotFoundError(f"data directory {data_root} not found (pass --data DIR)")
    run_dir = (Path(runs_dir) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    overrides: dict[str, bool | int | float | str] = {
        **DEFAULT_RUN_CONFIG,
        **parse_overrides(run_config),
        "data.dir": str(run_dir / "data"),
        "data.scenarios": ",".join(s.name for s in sources),
        "fed.min-clients": len(sources),
    }
    overrides.setdefault("run.cache-dir", str(run_dir / CACHE))
    return data_root, run_dir, overrides, Config.from_run_config({**Config().to_flat(), **overrides})


def parse_epsilons(text: str) -> list[float]:
    """``"1,4,8"`` -> [1.0, 4.0, 8.0]; each must be > 0."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--epsilons {text!r}: expected comma-separated numbers, e.g. 1,4,8") from None
    if any(not v > 0 for v in values):
        raise ValueError(f"--epsilons {text!r}: every epsilon must be > 0")
    return values


class CpuMeter:
    """CPU seconds (user + system) used by this process and every process below it (Flower, Ray workers),
    sampled every second: a load-independent measure beside the wall time on a shared machine."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> float:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                with self.lock:
                    self.seen[proc.pid] = max(self.seen.get(proc.pid, 0.0), times.user + times.system)
        with self.lock:
            return sum(self.seen.values())

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.sample()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class Progress:
    """One line per step, with the stage number and the elapsed time."""

    def __init__(self, stages: int) -> None:
        self.started, self.stages, self.stage = time.time(), stages, 0

    def begin(self, what: str) -> None:
        self.stage += 1
        self.show(f"[{self.stage}/{self.stages}] {what}")

    def show(self, text: str) -> None:
        elapsed = int(time.time() - self.started)
        # one write per line: the federation's thread and the references' print beside each other
        print(f"benchmark {elapsed // 60:3d}m{elapsed % 60:02d}s  {text}\n", end="", flush=True)

    def row(self, row: Row) -> None:
        metric = "auc" if "auc" in row["valid"] else "ndcg@10"
        self.show(
            f"    {row['reference']} {row['scenario']} round {row['round']}: valid {metric} {row['valid'][metric]:.4f}"
        )


def goal_notes(result: dict[str, Any]) -> list[str]:
    """Each goal as a line: measured vs target, met or missed (by how much)."""
    notes = []
    scenarios = result["scenarios"]
    for name, reference, metric, target, what in GOALS:
        value = scenarios.get(name, {}).get(reference, {}).get(metric)
        if value is not None:
            outcome = "met" if value >= target else f"missed by {target - value:.4f} ({value / target:.0%} of it)"
            notes.append(f"{name} {reference} {metric} {value:.4f} vs {target} ({what}): {outcome}")
    for name, refs in scenarios.items():
        metric = "auc" if "auc" in refs.get("popularity", refs.get("federated", {})) else "ndcg@10"
        if "federated" in refs and "local" in refs:  # met only when the paired interval is above 0
            fed, loc = refs["federated"][metric], refs["local"][metric]
            p = result.get("paired", {}).get(name, {}).get("federated - local")
            paired = f", paired {p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" if p else ", no paired interval"
            outcome = "met" if p is not None and verdict(p) == "better" else "missed"
            notes.append(f"{name}: federated {metric} {fed:.4f} vs local {loc:.4f}{paired}: {outcome}")
        for reference in (r for r in refs if r.startswith("federated-eps") and "federated" in refs):
            ratio = refs[reference][metric] / refs["federated"][metric]
            goal = PRIVATE_GOALS.get(float(reference.removeprefix("federated-eps")))
            outcome = "" if goal is None else f" (goal >= {goal:.2f}): {'met' if ratio >= goal else 'missed'}"
            notes.append(f"{name}: {reference} {metric} = {ratio:.3f} x federated{outcome}")
    fed_vs_central = [
        refs["federated"]["auc" if "auc" in refs["federated"] else "ndcg@10"]
        / refs["centralized"]["auc" if "auc" in refs["federated"] else "ndcg@10"]
        for refs in scenarios.values()
        if "federated" in refs and "centralized" in refs
    ]
    if fed_vs_central:
        ratio = sum(fed_vs_central) / len(fed_vs_central)
        notes.append(
            f"macro federated / centralized = {ratio:.3f} (goal >= 0.95): {'met' if ratio >= 0.95 else 'missed'}"
        )
    return notes


def benchmark(
    data: str | os.PathLike[str] | None = None,
    scenarios: str = DEFAULT_SCENARIOS,
    run_config: str = "",
    runs_dir: str | os.PathLike[str] = "runs",
    epsilons: Sequence[float] = (),
    references: Sequence[str] = REFERENCES,
    concurrent: bool = True,
) -> Path:
    """Run the benchmark; returns the run folder (``RUNS/benchmark-latest`` points at it).

    ``concurrent``: the federated simulation (its own processes) runs while the in-process references
    are computed, so both cores stay busy; otherwise one reference after another (then each reference's
    CPU seconds are its own)."""
    started, load_start = time.time(), os.getloadavg()
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        raise ValueError(f"unknown references {unknown} (known: {', '.join(REFERENCES)})")
    wanted = [r for r in REFERENCES if r in references]
    at = wanted.index("federated") + 1 if "federated" in wanted else 0  # the private runs follow the plain one
    wanted[at:at] = [f"federated-eps{e:g}" for e in epsilons]
    if not wanted:
        raise ValueError("nothing to run: name references (--references) or private runs (--epsilons)")
    sources = parse_sources(scenarios)
    data_root, run_dir, overrides, cfg = plan_run("benchmark", data, sources, run_config, runs_dir)
    data_dir = run_dir / "data"
    # beside the simulation's one-thread clients the in-process references get one thread: torch's default
    # (all cores) oversubscribes the CPU and stalls its threads (zero_shot measured 1,392 s wall this way on
    # 2 cores); a reference started after the federation has ended gets the cores again
    alone = with_threads(cfg, cfg.train.threads or torch.get_num_threads())
    beside = with_threads(cfg, cfg.train.threads or 1)
    run_dir.mkdir(parents=True, exist_ok=False)
    progress = Progress(1 + len(wanted))
    progress.begin(f"converting {len(sources)} scenarios from {data_root} into {data_dir}")
    convert(sources, data_root, data_dir, lenient=cfg.data.lenient)
    datasets = load_datasets(data_dir, cfg)

    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    meter = CpuMeter()
    vectors = None
    results: dict[str, list[Row]] = {}
    failures: list[BaseException] = []
    saving = threading.Lock()

    def run(reference: str) -> None:
        """One reference, timed; its rows go into ``results``."""
        nonlocal vectors
        cfg = beside if federation.is_alive() else alone
        in_process = not reference.startswith("federated")
        progress.begin(f"{reference} ({cfg.train.threads} torch threads)" if in_process else reference)
        t0, c0 = time.time(), meter.sample()
        if reference.startswith("federated"):
            epsilon = float(reference.removeprefix("federated-eps")) if reference != "federated" else 0.0
            # under DP the item memory stays frozen, so no ID embeddings (they would stay random)
            extra: dict[str, bool | int | float | str] = (
                {"privacy.epsilon": epsilon, "model.item-ids": False} if epsilon else {}
            )
            fed, _ = federated_rows(run_dir / reference, {**overrides, **extra}, len(datasets), cfg.fed.rounds)
            new = [r | {"reference": reference} for r in fed]
        elif reference == "zero_shot":
            new, vectors = zero_shot_rows(cfg, datasets, run_dir / reference)
        elif reference == "popularity":
            new = popularity_rows(datasets, vectors, run_dir / reference)
        elif reference == "local":
            new = [row for d in datasets for row in local_rows(cfg, d, progress.row, run_dir / reference)]
        elif reference == "sasrec":  # sequential scenarios only: news has cold items and untrained test users
            sequential = [d for d in datasets if d.scenario.impressions is None]
            new = [
                row
                for d in sequential
                for row in sasrec_rows(
                    cfg, d, progress.row, run_dir / reference, SASREC_SETTINGS.get(d.scenario.name, SASRecSettings())
                )
            ]
        else:
            new = centralized_rows(cfg, datasets, progress.row, run_dir / reference)
        timings[reference], cpu[reference] = time.time() - t0, meter.sample() - c0
        if reference.startswith("federated") or reference == "zero_shot":
            for row in new:
                progress.row(row)
        results[reference] = new
        with saving, (run_dir / "metrics.jsonl").open("a") as fh:  # kept if the run is stopped later
            fh.writelines(json.dumps(r) + "\n" for r in new)
        progress.show(
            f"    {reference} done in {timings[reference]:.0f}s (CPU of everything running {cpu[reference]:.0f}s)"
        )

    def run_federated() -> None:
        try:
            for reference in (r for r in wanted if r.startswith("federated")):
                run(reference)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
            failures.append(exc)

    # The Flower simulation runs in its own processes: the in-process references run beside it.
    federation = threading.Thread(target=run_federated, name="federated")
    with run_cache(run_dir, cfg):
        if concurrent:
            federation.start()
        else:
            run_federated()
        try:
            if not failures:
                for reference in (r for r in wanted if not r.startswith("federated")):
                    run(reference)
        finally:
            if concurrent:
                federation.join()
    if failures:
        raise failures[0]
    rows = [row for reference in wanted for row in results[reference]]

    timings["total"] = time.time() - started
    cpu["total"] = meter.sample()
    meter.close()
    load = os.getloadavg()
    notes = [
        f"run config: {' '.join(f'{k}={v}' for k, v in overrides.items() if k not in ('data.dir', 'run.cache-dir'))}",
        "CPU seconds (this process and all below it): "
        + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
        + f"; load average (1 / 5 / 15 min) at the start {' / '.join(f'{x:.1f}' for x in load_start)}, "
        f"at the end {' / '.join(f'{x:.1f}' for x in load)}",
    ]
    return finish(run_dir, Path(runs_dir), rows, wanted, timings, cpu, notes)


def finish(
    run_dir: Path,
    runs_dir: Path,
    rows: list[Row],
    references: Sequence[str],
    timings: dict[str, float],
    cpu: dict[str, float],
    notes: list[str],
    folders: dict[str, Path] | None = None,
) -> Path:
    """Select rounds on validation, write metrics.jsonl and the outputs, point ``benchmark-latest`` here.
    ``folders``: where each reference's per-user values are (default: ``run_dir/REFERENCE``)."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    selected = {}
    for reference in references:
        own = [r for r in rows if r["reference"] == reference]
        selected[reference] = {str(r["scenario"]): r for r in own} if own[0]["round"] == 0 else select_rounds(own)
    folders = {r: run_dir / r for r in references} | (folders or {})
    paired = paired_intervals(selected, folders)
    notes = [*notes, *goal_notes(summary(selected) | {"paired": paired})]
    popularity = by_target_popularity(selected, folders, run_dir / "data")
    extra = {"cpu_seconds": cpu, "notes": notes, "paired": paired, "popularity": popularity}
    result = write_outputs(run_dir, rows, selected, timings, notes, extra)
    latest = runs_dir.resolve() / "benchmark-latest"
    tmp_link = latest.with_name(".benchmark-latest-tmp")
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(os.path.relpath(run_dir, latest.parent))
    os.replace(tmp_link, latest)
    print_table(result)
    for line in paired_table(result.get("paired", {})):
        print(line)
    for note in notes[2:]:
        print(f"  {note}")
    print(f"crossrec: benchmark done in {timings['total']:.0f}s; outputs in {latest} -> {run_dir.name}")
    return run_dir


def merge(parts: Sequence[str | os.PathLike[str]], runs_dir: str | os.PathLike[str] = "runs") -> Path:
    """One benchmark from finished runs of the same run config and data, each holding other references
    (e.g. references run as separate processes on a shared machine); wall and CPU seconds are each
    part's own, ``total`` is the longest part. A part may also be a benchmark stopped before its end (the
    rows of the references it finished, saved as each finished) or the Flower run folder of a benchmark's
    federated reference (``RUN/federated``): rows only, no timings."""
    rows: list[Row] = []
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    folders: dict[str, Path] = {}
    config = None
    for part in map(Path, parts):
        own = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
        clash = {r["reference"] for r in own} & {r["reference"] for r in rows}
        if clash:
            raise ValueError(f"{part}: references {sorted(clash)} are already in an earlier part")
        rows += own
        for reference in {str(r["reference"]) for r in own}:  # per-user values stay in the part
            folders[reference] = part if (part / "clients").is_dir() else part / reference
        if not (part / "summary.json").is_file():  # a stopped benchmark or a Flower run folder: rows only
            continue
        result = json.loads((part / "summary.json").read_text())
        if config is not None and result["notes"][0] != config:
            raise ValueError(f"{part}: ran with another config ({result['notes'][0]!r} vs {config!r})")
        config = result["notes"][0]
        for key, value in result["wall_seconds"].items():
            timings[key] = max(timings.get(key, 0.0), value) if key == "total" else value
        for key, value in result.get("cpu_seconds", {}).items():
            cpu[key] = cpu.get(key, 0.0) + value if key == "total" else value
    if config is None:
        raise ValueError("nothing to merge")
    references = list(dict.fromkeys(str(x["reference"]) for x in rows))
    run_dir = (Path(runs_dir) / f"benchmark-{time.strftime('%Y%m%d-%H%M%S')}-merged").resolve()
    run_dir.mkdir(parents=True)
    notes = [config, "merged from " + ", ".join(str(Path(p).resolve()) for p in parts)]
    return finish(run_dir, Path(runs_dir), rows, references, timings, cpu, notes, folders)
