"""A client's own state on disk: its privacy ledger and its scenario-private parameters (item memory,
its own copies of the ``fed.personal`` modules).

Both live in one folder per scenario: ``<state-dir>`` for a client daemon (node config ``state-dir``),
``<run.dir>/clients/<scenario>/`` in a simulation. A resumed simulation (``run.resume`` =
``<old run>/checkpoints/round-N``) reads what it lacks from ``<old run>/clients/<scenario>/``.

The private state is written after every trained round: ``private.safetensors`` (the latest, what the
service reads) and a copy per run and round, ``private/<run key>/round-NNNN.safetensors``, from which a
client loads it (:func:`private_source`): each run starts from text alone and the global modules, and a
resumed run continues from its resumed run's copy at the checkpoint's round, so it reproduces the
uninterrupted run.

The private file holds every ``memory.*`` parameter with the catalog's item ids, so it loads onto a
changed catalog by id: items it does not know (new items) start from their text alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shared.config import Config
from shared.model import PRIVATE_PREFIX, REPEAT_NAME, RecModel

PRIVATE_FILE = "private.safetensors"


def state_folder(cfg: Config, node_config: Mapping[str, object], scenario: str) -> Path | None:
    """Client daemon: ``<state-dir>``; simulation: ``<run.dir>/clients/<scenario>``; None when neither."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    if cfg.run.dir:
        return Path(cfg.run.dir) / "clients" / scenario
    return None


def resumed_file(cfg: Config, path: Path, scenario: str) -> Path:
    """``path`` if it exists, else the same file of the run that ``run.resume`` continues (if any)."""
    if path.exists() or not cfg.run.resume:
        return path
    return Path(cfg.run.resume).resolve().parents[1] / "clients" / scenario / path.name


def run_key(run_dir: str) -> str:
    """The folder of one run's private copies: a hash of its run folder (``run.dir``, resolved), or
    ``default`` for runs that name none."""
    if not run_dir:
        return "default"
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def round_copy(path: Path, run_dir: str, server_round: int) -> Path:
    """The copy of a private file kept after one trained round of one run:
    ``<state>/private/<run key>/round-NNNN.safetensors``."""
    return path.parent / "private" / run_key(run_dir) / f"round-{server_round:04d}.safetensors"


def _latest_copy(folder: Path, upto: int) -> Path | None:
    rounds = sorted((int(c.stem[6:]), c) for c in folder.glob("round-[0-9][0-9][0-9][0-9].safetensors"))
    kept = [c for r, c in rounds if r <= upto]
    return kept[-1] if kept else None


def private_source(cfg: Config, path: Path, scenario: str, upto: int) -> Path | None:
    """The private memory this client had after round ``upto`` of this run (training round r: r - 1;
    evaluating round r: r): its latest copy of this run up to that round; in a resumed run without one,
    the resumed run's latest copy up to the checkpoint's round (in this state folder, or in a simulation
    in the resumed run's ``clients/<scenario>/``); None: text alone. A run never starts from another run's
    memory, so a resumed run sees exactly the memory its uninterrupted run had."""
    own = _latest_copy(round_copy(path, cfg.run.dir, 0).parent, upto)
    if own is not None or not cfg.run.resume:
        return own
    checkpoint = Path(cfg.run.resume).resolve()
    if not (checkpoint.name.startswith("round-") and checkpoint.name[6:].isdigit()):
        return None
    old_run = checkpoint.parents[1]
    for folder in (path.parent, old_run / "clients" / scenario):
        found = _latest_copy(folder / "private" / run_key(str(old_run)), min(upto, int(checkpoint.name[6:])))
        if found is not None:
            return found
    return None


def is_private(model: RecModel, name: str) -> bool:
    """Whether parameter ``name`` lives in the client's private state: the item memory (never sent) or a
    module of ``fed.personal`` (sent too, but the client keeps training its own copy)."""
    return name.startswith(PRIVATE_PREFIX) or name.split(".", 1)[0] in model.cfg.fed.personal_modules


def private_state(model: RecModel) -> dict[str, torch.Tensor]:
    """Copies of the parameters kept in the client's private state, by name (empty without an item memory
    and personal modules)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_private(model, n)}


def private_scenario(path: Path) -> str | None:
    """The scenario a private file was written for (None when unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("scenario")
    except (OSError, SafetensorError):
        return None


def save_private(model: RecModel, path: Path, scenario: str, item_ids: list[str]) -> None:
    """Write the private parameters, the scenario's name and its catalog's item ids atomically (temp file,
    fsync, rename)."""
    state = private_state(model)
    if not state:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        metadata = {"scenario": scenario, "item_ids": json.dumps(item_ids)}
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """A private file's item ids and tensors; an unreadable file is an error naming it."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            stored_ids = json.loads((fh.metadata() or {})["item_ids"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise ValueError(f"private state {path} is unreadable ({exc}); move it away to start from text alone") from None
    return stored_ids, tensors


def _personal(model: RecModel, tensors: Mapping[str, torch.Tensor], path: Path) -> list[str]:
    """The personal-module parameters and the repeat logit the file holds (a file written before
    ``fed.personal`` named them holds none: the global ones stay), each checked to have the model's exact
    shape."""
    params = dict(model.named_parameters())
    names = [n for n in private_state(model) if (n == REPEAT_NAME or not n.startswith(PRIVATE_PREFIX)) and n in tensors]
    for name in names:
        if tensors[name].shape != params[name].shape:
            raise ValueError(
                f"private state {path}: '{name}' has shape {tuple(tensors[name].shape)}, the model needs "
                f"{tuple(params[name].shape)}: written by a different model"
            )
    return names


def _copy(model: RecModel, tensors: Mapping[str, torch.Tensor], names: list[str]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(tensors[name].to(params[name].dtype))


def load_personal(model: RecModel, path: Path) -> None:
    """Load only the personal modules of a private file (a model without its catalog's memory attached)."""
    _, tensors = _read(path)
    _copy(model, tensors, _personal(model, tensors, path))


def load_private(model: RecModel, path: Path, item_ids: list[str]) -> int:
    """Load private parameters written by :func:`save_private` onto the model's catalog ``item_ids``:
    the item memory's rows matched by item id, personal modules as they are (:func:`load_personal`);
    returns how many catalog items it knew. Shapes other than the item count must match; a file that
    cannot be read is an error naming it (nothing is loaded)."""
    params = dict(model.named_parameters())
    stored_ids, tensors = _read(path)
    private = [n for n in params if is_private(model, n)]
    scenario = [n for n in private if n == REPEAT_NAME]  # the scenario's, not per item
    memory = [n for n in private if n.startswith(PRIVATE_PREFIX) and n not in scenario]
    missing = sorted(n for n in memory + scenario if n not in tensors)
    if missing:
        raise ValueError(f"private state {path} lacks {missing}: written by a different model")
    for name in memory:  # every check before anything is loaded
        param, stored = params[name], tensors[name]
        if stored.shape[0] != len(stored_ids) or stored.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"private state {path}: '{name}' has shape {tuple(stored.shape)}, the model needs "
                f"(items, {', '.join(map(str, param.shape[1:]))})"
            )
    personal = _personal(model, tensors, path)
    rows = {item: i for i, item in enumerate(stored_ids)}
    known = [(i, rows[item]) for i, item in enumerate(item_ids) if item in rows]
    target = torch.tensor([i for i, _ in known], dtype=torch.long)
    source = torch.tensor([j for _, j in known], dtype=torch.long)
    _copy(model, tensors, personal)
    with torch.no_grad():
        for name in memory:
            params[name].zero_()
            params[name][target] = tensors[name][source].to(params[name].dtype)
    return len(known)
