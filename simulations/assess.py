"""``crossrec evaluate`` and ``crossrec check-data``: judge any checkpoint on any scenario folder with the
benchmark's protocol, and check a scenario folder before it joins a federation."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client.evaluation import evaluate, frozen_table
from client.serving import private_file
from client.state import load_private
from client.training import LocalData, build_model, prepare
from shared.checkpoint import checkpoint_round, read_checkpoint
from shared.config import Config
from shared.data import load_scenario
from shared.files import atomic_write_bytes
from shared.metrics import Row
from shared.records import load_trainable

from .references import popularity_rows, split_metrics, zero_shot_rows
from .report import results_table

log = logging.getLogger(__name__)
REFERENCES = ("popularity", "zero_shot")


def scenario_data(folders: Sequence[str | Path], cfg: Config) -> list[LocalData]:
    """Each scenario folder loaded, validated and split as the federation would (objectives checked
    against ``cfg``'s model)."""
    datasets = [prepare(load_scenario(folder, lenient=cfg.data.lenient), cfg) for folder in folders]
    names = [d.scenario.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"a scenario is given twice: {names}")
    return datasets


def evaluate_checkpoint(
    checkpoint: str | Path,
    scenarios: Sequence[str | Path],
    references: Sequence[str] = (),
    state_dirs: Sequence[str | Path] = (),
    split: str = "test",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """The checkpoint (a run folder: its round chosen on validation; a checkpoint folder; an adapter export)
    on each scenario folder, with the benchmark's protocol (:func:`client.evaluation.evaluate`: full
    ranking with nothing masked, or impressions; ties in expectation), and the references asked for beside
    it. A scenario whose private item memory is found (a given state folder, else the checkpoint's run
    folder, the copy of the checkpoint's round: :func:`client.serving.private_file`) is scored with it,
    any other from its text alone. Prints a table of ``split``'s metrics; writes all as JSON to ``out``."""
    if split not in ("valid", "test"):
        raise ValueError(f"--split must be 'valid' or 'test', got {split!r}")
    unknown = sorted(set(references) - set(REFERENCES))
    if unknown:
        raise ValueError(f"--references: unknown {unknown} (known: {', '.join(REFERENCES)})")
    cfg, folder, weights = read_checkpoint(checkpoint)
    _, server_round = checkpoint_round(folder)
    datasets = scenario_data(scenarios, cfg)
    rows: list[Row] = []
    memory: dict[str, str | None] = {}
    order = {d.scenario.name: d.scenario.order for d in datasets}  # what the leave-one-out split follows
    for data in datasets:
        name = data.scenario.name
        log.info("evaluating %s on %s (%d items)", folder, name, data.scenario.num_items)
        model = build_model(cfg, data)
        load_trainable(model, weights)
        has_private = model.memory is not None or bool(cfg.fed.personal_modules)
        private = private_file(folder, name, [Path(d) for d in state_dirs], cfg.run.dir) if has_private else None
        if private is not None:
            known = load_private(model, private, data.scenario.item_ids)
            log.info("%s: private state %s (%d of %d items known)", name, private, known, data.scenario.num_items)
        memory[name] = None if private is None else str(private)
        metrics = split_metrics(evaluate(model, data, cfg))
        rows.append({"round": server_round or 0, "scenario": name, "reference": "checkpoint", **metrics})
    if "zero_shot" in references:
        zero_shot, vectors = zero_shot_rows(cfg, datasets)
        rows += zero_shot
    else:
        vectors = {d.scenario.name: frozen_table(cfg, d.scenario.texts) for d in datasets if references}
    if "popularity" in references:  # ILD in the frozen encoder's space, as every report measures it
        rows += popularity_rows(datasets, vectors)
    tables: dict[str, dict[str, dict[str, Any]]] = {"scenarios": {}, "valid": {}, "selected_round": {}}
    for row in rows:
        tables["scenarios"].setdefault(row["scenario"], {})[row["reference"]] = row[split]
        tables["valid"].setdefault(row["scenario"], {})[row["reference"]] = row["valid"]
        tables["selected_round"].setdefault(row["scenario"], {})[row["reference"]] = row["round"]
    result: dict[str, Any] = {"checkpoint": str(folder), "round": server_round, "split": split, **tables}
    result |= {"private_memory": memory, "order": order}
    for line in results_table(result):
        print(line)
    if out is not None:
        atomic_write_bytes(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
        print(f"wrote {out}")
    return result


def check_data(folder: str | Path, cfg: Config | None = None) -> dict[str, Any]:
    """Load a scenario folder strictly, split it as the federation would and print what it holds; bad
    rows raise with file, line and field (:func:`shared.data.load_scenario`)."""
    cfg = cfg or Config()
    data = scenario_data([folder], cfg)[0]
    s = data.scenario
    facts: dict[str, Any] = {
        "scenario": s.name,
        "objectives": list(s.objectives),
        "items": s.num_items,
        "users": len(s.users),
        "interactions": s.num_interactions,
        "order": s.order if s.order == "timestamp" else "line order of interactions.jsonl (no timestamps)",
        "trainable users": len(data.trainable_users),
        "training positions": data.num_examples,
        "evaluated users": len(data.split.eval_users),
        "items with a category": None if s.categories is None else sum(c is not None for c in s.categories),
        "impressions": None if s.impressions is None else len(s.impressions.impression_ids),
    }
    width = max(map(len, facts))
    for key, value in facts.items():
        if value is not None:
            print(f"{key:>{width}}: {value}")
    print(f"{folder}: ok")
    return facts
