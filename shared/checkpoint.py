"""Round checkpoints (safetensors + JSON metadata), resume, and export of the adapter in peft's layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from .config import Config
from .files import atomic_folder
from .metrics import select_rounds

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"


def checkpoint_dir(run_dir: str | Path, server_round: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round-{server_round:04d}"


def save_checkpoint(
    run_dir: str | Path, server_round: int, arrays: dict[str, np.ndarray], cfg: Config, meta: dict[str, Any]
) -> Path:
    """Write ``checkpoints/round-NNNN/`` atomically (temp folder renamed into place)."""
    final = checkpoint_dir(run_dir, server_round)
    with atomic_folder(final) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / WEIGHTS_FILE))
        record = {"round": server_round, "model_hash": cfg.model_hash(), "config": cfg.to_flat(), **meta}
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return final


def load_checkpoint(folder: str | Path, cfg: Config) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    """(round, weights, metadata) of a checkpoint folder; its model must match ``cfg``'s."""
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise ValueError(f"run.resume = '{folder}': not a checkpoint folder (needs {META_FILE} and {WEIGHTS_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("model_hash") != cfg.model_hash():
        raise ValueError(
            f"run.resume = '{folder}': checkpoint was written for a different model.*/lora.*/fed.aggregation config "
            f"(hash {meta.get('model_hash')} vs {cfg.model_hash()})"
        )
    return int(meta["round"]), load_file(str(weights_path)), meta


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-round checkpoint in a run folder, if any."""
    rounds = sorted((Path(run_dir) / "checkpoints").glob("round-[0-9][0-9][0-9][0-9]"))
    return rounds[-1] if rounds else None


def export_adapter(model: Any, folder: str | Path) -> None:
    """Adapter via peft ``save_pretrained``, plus the user model and head beside it."""
    folder = Path(folder)
    model.encoder.save_pretrained(str(folder))
    rest = {
        n: p.detach().cpu().numpy()
        for n, p in model.named_parameters()
        if p.requires_grad and not n.startswith("encoder.")
    }
    save_file(rest, str(folder / "crossrec_head.safetensors"))


def chosen_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of a run folder chosen on validation: the round whose scenarios' validation metrics
    (in each checkpoint's ``meta.json``) are best by :func:`shared.metrics.select_rounds`, the rule every
    report uses; the latest round when the checkpoints hold no validation metrics; None without any."""
    folders = sorted((Path(run_dir) / "checkpoints").glob("round-[0-9][0-9][0-9][0-9]"))
    rows = []
    for folder in folders:
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder / META_FILE}: unreadable checkpoint metadata ({exc})") from None
        for scenario, split in (meta.get("metrics") or {}).items():
            if split.get("valid"):
                rows.append({"round": meta["round"], "scenario": scenario, "reference": "federated", **split})
    if not rows:
        return folders[-1] if folders else None
    chosen = next(iter(select_rounds(rows).values()))
    return checkpoint_dir(run_dir, int(chosen["round"]))


def read_checkpoint(path: str | Path) -> tuple[Config, Path, dict[str, np.ndarray]]:
    """(training config, checkpoint folder, weights) of a checkpoint folder, or of a run folder: the round
    chosen on validation (:func:`chosen_checkpoint`; pass ``RUN/checkpoints/round-NNNN`` for another)."""
    path = Path(path)
    folder = path if (path / META_FILE).is_file() else chosen_checkpoint(path)
    if folder is None or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path}: neither a checkpoint folder nor a run folder with checkpoints")
    if folder != path:
        log.info("%s: the round chosen on validation, %s", path, folder.name)
    meta = json.loads((folder / META_FILE).read_text())
    cfg = Config.from_run_config(meta["config"])
    _, weights, _ = load_checkpoint(folder, cfg)
    return cfg, folder, weights
