"""Round checkpoints (safetensors + JSON metadata), resume, and export of the adapter in peft's layout."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .config import DEFAULT_ENCODER, LATER_KEYS, Config
from .files import atomic_folder
from .metrics import select_rounds
from .model import PRIVATE_PREFIX

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


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``, checked for the keys every reader needs."""
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc})") from None
    missing = [k for k in ("round", "model_hash", "config") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{path}: not a crossrec checkpoint's metadata (no {', '.join(missing)})")
    if not isinstance(meta["config"], dict) or not isinstance(meta["round"], int):
        raise ValueError(f"{path}: 'config' must be an object and 'round' an integer")
    return meta


def load_checkpoint(folder: str | Path, cfg: Config) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    """(round, weights, metadata) of a checkpoint folder; its model must match ``cfg``'s, and its file
    must be whole and every weight finite."""
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise ValueError(f"run.resume = '{folder}': not a checkpoint folder (needs {META_FILE} and {WEIGHTS_FILE})")
    meta = read_meta(folder)
    if meta.get("model_hash") not in (cfg.model_hash(), cfg.model_hash(hashed_then=("model.item-ids",))):
        raise ValueError(
            f"run.resume = '{folder}': checkpoint was written for a different model.*/lora.*/fed.aggregation config "
            f"(hash {meta.get('model_hash')} vs {cfg.model_hash()})"
        )
    try:
        weights = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{weights_path} is unreadable (truncated or not safetensors: {exc})") from None
    bad = [k for k, v in weights.items() if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"{weights_path}: non-finite values in {', '.join(bad[:3])}")
    return int(meta["round"]), weights, meta


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-round checkpoint in a run folder, if any."""
    rounds = sorted((Path(run_dir) / "checkpoints").glob("round-[0-9][0-9][0-9][0-9]"))
    return rounds[-1] if rounds else None


HUB_IDS = {DEFAULT_ENCODER: "sentence-transformers/all-MiniLM-L6-v2"}  # the packaged encoder's public id
ADAPTER_META = "crossrec_config.json"
ADAPTER_HEAD = "crossrec_head.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"


def export_adapter(model: Any, folder: str | Path, server_round: int) -> None:
    """A portable export of the shared model of one round, written atomically: the LoRA adapter in peft's
    ``save_pretrained`` layout (base model named by its public id, ``task_type`` FEATURE_EXTRACTION: it loads
    on any machine with ``PeftModel.from_pretrained``), the rest of the shared model (text adaptor,
    sequence encoder, head; never the private memory) in ``crossrec_head.safetensors``, and in
    ``crossrec_config.json`` everything needed to rebuild crossrec's item and user vectors from it
    (config, pooling, the shapes of every tensor). ``crossrec recommend --checkpoint`` reads the folder."""
    cfg: Config = model.cfg
    with atomic_folder(folder) as tmp:
        model.encoder.save_pretrained(str(tmp))
        peft_config = json.loads((tmp / "adapter_config.json").read_text())
        peft_config["base_model_name_or_path"] = HUB_IDS.get(cfg.model.encoder, cfg.model.encoder)
        peft_config["task_type"] = "FEATURE_EXTRACTION"
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        rest = {
            n: p.detach().cpu().numpy()
            for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith(("encoder.", PRIVATE_PREFIX))
        }
        save_file(rest, str(tmp / ADAPTER_HEAD))
        meta = {
            "round": server_round,
            "encoder": peft_config["base_model_name_or_path"],
            "config": cfg.to_flat(),
            "model_hash": cfg.model_hash(),
            "item_vector": "unit(adaptor(text)), text = L2-normalised mean over real tokens of the last layer "
            f"(at most model.max-length = {cfg.model.max_length} tokens), adapter on the top "
            f"lora.layers = {cfg.lora.layers} layers",
            "shapes": {n: list(v.shape) for n, v in rest.items()},
        }
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_adapter(folder: Path) -> tuple[Config, int, dict[str, np.ndarray]]:
    """(config, round, shared weights by model parameter name) of a folder written by :func:`export_adapter`."""
    try:
        meta = json.loads((folder / ADAPTER_META).read_text())
        weights = load_file(str(folder / ADAPTER_HEAD))
        lora = load_file(str(folder / PEFT_WEIGHTS))
        cfg = Config.from_run_config({**LATER_KEYS, **meta["config"]})
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ValueError(f"{folder}: not a readable crossrec adapter export ({exc})") from None
    for key, value in lora.items():  # peft's file names drop the adapter name ("default")
        if not (cfg.fed.aggregation == "ffa" and ".lora_A." in key):  # ffa: A is drawn from the seed, not loaded
            weights["encoder." + key.replace(".weight", ".default.weight")] = value
    return cfg, int(meta["round"]), weights


def chosen_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of a run folder chosen on validation: the round whose scenarios' validation metrics
    (in each checkpoint's ``meta.json``) are best by :func:`shared.metrics.select_rounds`, the rule every
    report uses; the latest round when the checkpoints hold no validation metrics; None without any."""
    folders = sorted((Path(run_dir) / "checkpoints").glob("round-[0-9][0-9][0-9][0-9]"))
    rows = []
    for folder in folders:
        meta = read_meta(folder)
        for scenario, split in (meta.get("metrics") or {}).items():
            if split.get("valid"):
                rows.append({"round": meta["round"], "scenario": scenario, "reference": "federated", **split})
    if not rows:
        return folders[-1] if folders else None
    chosen = next(iter(select_rounds(rows).values()))
    return checkpoint_dir(run_dir, int(chosen["round"]))


def read_checkpoint(path: str | Path) -> tuple[Config, Path, dict[str, np.ndarray]]:
    """(training config, checkpoint folder, weights) of a checkpoint folder, of an adapter export
    (:func:`export_adapter`), or of a run folder: the round chosen on validation (:func:`chosen_checkpoint`;
    pass ``RUN/checkpoints/round-NNNN`` for another)."""
    path = Path(path)
    if (path / ADAPTER_META).is_file():
        cfg, _, weights = read_adapter(path)
        return cfg, path, weights
    folder = path if (path / META_FILE).is_file() else chosen_checkpoint(path)
    if folder is None or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path}: neither a checkpoint folder, an adapter export nor a run folder with checkpoints")
    if folder != path:
        log.info("%s: the round chosen on validation, %s", path, folder.name)
    cfg = Config.from_run_config({**LATER_KEYS, **read_meta(folder)["config"]})
    _, weights, _ = load_checkpoint(folder, cfg)
    return cfg, folder, weights


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """A short hash of a model's shared weights (names, dtypes, shapes, values): the id a service reports."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        value = np.ascontiguousarray(weights[key])
        digest.update(f"{key}:{value.dtype}:{value.shape}".encode() + value.tobytes())
    return digest.hexdigest()[:16]


def checkpoint_round(folder: Path) -> tuple[Path, int | None]:
    """(run folder, round) a checkpoint folder or adapter export belongs to (round None when unknown)."""
    if (folder / ADAPTER_META).is_file():
        return folder.resolve().parent, int(json.loads((folder / ADAPTER_META).read_text())["round"])
    name = folder.resolve().name
    return folder.resolve().parents[1], int(name[6:]) if name.startswith("round-") and name[6:].isdigit() else None
