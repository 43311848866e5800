"""Canonical scenario data: schema, validating loader, writer and leave-one-out split.

A scenario is a folder with three files (UTF-8):

``scenario.json``
    ``{"name": "shop", "objectives": ["engagement", "satisfaction"]}``: the objectives this
    scenario has labels for. The first model objective (engagement) is the interaction itself.
``items.jsonl``
    One JSON object per line: ``item_id`` (str, unique), ``text`` (str, non-empty), optional
    ``category`` (str) and ``value`` (number, e.g. price or margin).
``interactions.jsonl``
    One JSON object per line: ``user_id`` (str), ``item_id`` (str, in the catalog),
    ``timestamp`` (number; order within a user, ties broken by item id: integer ids numerically; optional: a
    log without any timestamp is ordered by its lines, and ``Scenario.order`` says which), and for every labelled
    objective other than the first an optional 0/1 field of that name (missing = unlabelled).
``impressions.jsonl`` (optional: impression scenarios such as news)
    One JSON object per line: ``impression_id`` (integer >= 0, unique), ``user_id`` (str, in the log),
    ``timestamp`` (number), ``candidates`` (non-empty list of catalog item ids) and ``clicks`` (0/1 per
    candidate). The impression's history is the user's interactions with a smaller timestamp (at least
    one). Split by impression id: ``id mod 10`` in {0, 1} test, {2} validation, the rest train; a user
    with a validation or test impression is an evaluation user whose log is never trained on.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_folder

ITEMS_FILE = "items.jsonl"
INTERACTIONS_FILE = "interactions.jsonl"
SCENARIO_FILE = "scenario.json"
IMPRESSIONS_FILE = "impressions.jsonl"
IMPRESSION_SPLITS = {"test": (0, 1), "valid": (2,)}  # impression id mod 10; every other id is train


class DataError(ValueError):
    """Malformed scenario data; the message names file, line and field."""


@dataclass
class ImpressionLog:
    """Impressions of a scenario: candidate lists with click labels, each seen by one user at one time."""

    impression_ids: np.ndarray  # (M,) int
    users: np.ndarray  # (M,) user index into Scenario.users
    timestamps: np.ndarray  # (M,) float
    history_lengths: np.ndarray  # (M,) how many of the user's (time-ordered) interactions precede it
    candidates: list[np.ndarray]  # per impression: item indices
    clicks: list[np.ndarray]  # per impression: 0/1 per candidate

    def positions(self, split: str) -> np.ndarray:
        """Impression positions of ``split`` ("train", "valid", "test") by impression id mod 10."""
        return impression_positions(self.impression_ids, split)


def impression_positions(impression_ids: np.ndarray, split: str) -> np.ndarray:
    """Positions of the impressions of ``split``: id mod 10 in {0, 1} test, {2} validation, the rest train."""
    if split not in ("train", *IMPRESSION_SPLITS):
        raise ValueError(f"unknown split {split!r}")
    held_out = [r for rs in IMPRESSION_SPLITS.values() for r in rs]
    wanted = IMPRESSION_SPLITS.get(split, tuple(r for r in range(10) if r not in held_out))
    return np.flatnonzero(np.isin(np.asarray(impression_ids) % 10, wanted))


@dataclass
class Scenario:
    """One scenario's catalog and interaction log, items as integer indices."""

    name: str
    objectives: tuple[str, ...]  # objectives with labels here (the first is engagement)
    item_ids: list[str]
    texts: list[str]
    users: list[str]
    sequences: list[np.ndarray]  # per user: item indices, oldest first
    labels: dict[str, list[np.ndarray]]  # objective -> per user: 0/1 or nan, aligned with sequences
    categories: list[str | None] | None = None  # (N,) item category where given; None: no categories
    values: np.ndarray | None = None  # (N,) item value (price, margin, ...), nan where unknown; None: no values
    skipped: dict[str, int] = field(default_factory=dict)  # lenient mode: reason -> rows skipped
    impressions: ImpressionLog | None = None  # impression scenarios (news): evaluated on impressions
    order: str = "timestamp"  # what orders each user's log: "timestamp", or "line order" (a log without timestamps)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


@dataclass
class Split:
    """Leave-one-out split: the last item of each user is test, the one before it validation.

    Impression scenarios (``Scenario.impressions``) split by impression instead: evaluation users
    (those with a validation or test impression) have an empty training sequence, every other user
    trains on their whole log; ``valid_target``/``test_target`` hold the first clicked candidate of
    the user's validation/test impression, -1 where the user has none in that split, and
    ``valid_impressions``/``test_impressions`` the impression positions to evaluate.
    """

    train: list[np.ndarray]  # per user: training sequence (every user, possibly all of it)
    train_labels: dict[str, list[np.ndarray]]
    eval_users: np.ndarray  # users with >= 3 interactions (they have a validation and a test item)
    valid_target: np.ndarray  # (U,) item index
    test_target: np.ndarray  # (U,)
    valid_impressions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    test_impressions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def train_counts(split: Split, num_items: int) -> np.ndarray:
    """(num_items,) how often each item occurs in the split's training sequences (int64)."""
    return np.bincount(np.concatenate(split.train), minlength=num_items)


def natural_key(identifier: str) -> tuple[int, int | str]:
    """Order of ids: integers numerically ("2" before "10"), then other strings."""
    return (0, int(identifier)) if identifier.isdigit() else (1, identifier)


def leave_one_out(scenario: Scenario) -> Split:
    """Split every user with at least three interactions: ..., validation, test (impression scenarios:
    :func:`impression_split`)."""
    if scenario.impressions is not None:
        return impression_split(scenario, scenario.impressions)
    train, eval_users, valid, test = [], [], [], []
    train_labels: dict[str, list[np.ndarray]] = {k: [] for k in scenario.labels}
    for u, seq in enumerate(scenario.sequences):
        cut = len(seq) - 2 if len(seq) >= 3 else len(seq)
        train.append(seq[:cut])
        for k, lab in scenario.labels.items():
            train_labels[k].append(lab[u][:cut])
        if cut < len(seq):
            eval_users.append(u)
            valid.append(seq[-2])
            test.append(seq[-1])
    return Split(
        train=train,
        train_labels=train_labels,
        eval_users=np.asarray(eval_users, dtype=np.int64),
        valid_target=np.asarray(valid, dtype=np.int64),
        test_target=np.asarray(test, dtype=np.int64),
    )


def impression_split(scenario: Scenario, log: ImpressionLog) -> Split:
    """Split by impression id; evaluation users' logs are evaluation input only (see :class:`Split`)."""
    valid, test = log.positions("valid"), log.positions("test")
    eval_users = np.unique(log.users[np.concatenate([valid, test])])
    row = {int(u): i for i, u in enumerate(eval_users)}
    targets = {name: np.full(len(eval_users), -1, dtype=np.int64) for name in ("valid", "test")}
    for name, positions in (("valid", valid), ("test", test)):
        for m in positions[np.argsort(-log.timestamps[positions], kind="stable")]:  # the earliest one wins
            clicked = log.candidates[m][log.clicks[m] == 1]
            if len(clicked):
                targets[name][row[int(log.users[m])]] = clicked[0]
    held = set(row)
    train = [seq[:0] if u in held else seq for u, seq in enumerate(scenario.sequences)]
    train_labels = {
        k: [lab[:0] if u in held else lab for u, lab in enumerate(labs)] for k, labs in scenario.labels.items()
    }
    return Split(train, train_labels, eval_users, targets["valid"], targets["test"], valid, test)


def encoding_error(path: Path, encoding: str) -> DataError:
    """The error for a file that is not valid ``encoding`` text, naming the first bad line."""
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            raw.decode(encoding)
        except UnicodeDecodeError as exc:
            return DataError(f"{path}:{lineno}: not valid {encoding} text (byte {raw[exc.start : exc.start + 1]!r})")
    return DataError(f"{path}: not valid {encoding} text")


def _read_jsonl(path: Path, lenient: bool, skipped: Counter[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for every non-blank line; malformed lines raise or are skipped."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        yield from _jsonl_lines(path, lenient, skipped)
    except UnicodeDecodeError:
        raise encoding_error(path, "utf-8") from None


def _jsonl_lines(path: Path, lenient: bool, skipped: Counter[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if lenient:
                    skipped[f"{path.name}: malformed JSON"] += 1
                    continue
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc})") from None
            yield lineno, obj


def _field(obj: dict[str, Any], name: str, kind: str, where: str, required: bool = True) -> Any:
    value = obj.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: field '{name}' is missing")
        return None
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field '{name}' must be a non-empty string, got {value!r}")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{where}: field '{name}' must be a finite number, got {value!r}")
    elif kind == "label":
        if isinstance(value, bool) or value not in (0, 1):
            raise DataError(f"{where}: field '{name}' must be 0 or 1, got {value!r}")
    return value


def _count_skip(skipped: Counter[str], file: str, exc: DataError) -> None:
    """Lenient mode: count a skipped row under its file and the kind of problem (the row's values left out)."""
    reason = str(exc).split(": ", 1)[1]
    skipped[f"{file}: {reason.split(' got ')[0].split(' {')[0]}"] += 1


def load_scenario(folder: str | os.PathLike[str], *, lenient: bool = False) -> Scenario:
    """Load and validate one scenario folder in the canonical format.

    Strict mode raises :class:`DataError` on the first bad row; lenient mode skips bad rows and
    records how many were skipped and why in ``Scenario.skipped``.
    """
    folder = Path(folder)
    meta_path = folder / SCENARIO_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: file not found (is {folder} a scenario folder?)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise encoding_error(meta_path, "utf-8") from None
    except ValueError as exc:
        raise DataError(f"{meta_path}: malformed JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: must hold a JSON object")
    name = _field(meta, "name", "str", str(meta_path))
    objectives = meta.get("objectives")
    if not isinstance(objectives, list) or not objectives or not all(isinstance(o, str) for o in objectives):
        raise DataError(f"{meta_path}: field 'objectives' must be a non-empty list of names")

    skipped: Counter[str] = Counter()
    item_index: dict[str, int] = {}
    texts: list[str] = []
    values: list[float] = []
    categories: list[str | None] = []
    items_path = folder / ITEMS_FILE
    for lineno, obj in _read_jsonl(items_path, lenient, skipped):
        where = f"{items_path}:{lineno}"
        try:
            item_id = _field(obj, "item_id", "str", where)
            text = _field(obj, "text", "str", where)
            category = _field(obj, "category", "str", where, required=False)
            value = _field(obj, "value", "number", where, required=False)
            if item_id in item_index:
                raise DataError(f"{where}: field 'item_id' {item_id!r} repeats an earlier item")
        except DataError as exc:
            if not lenient:
                raise
            skipped[f"{ITEMS_FILE}: {str(exc).split(': ', 1)[1]}"] += 1
            continue
        item_index[item_id] = len(texts)
        texts.append(text)
        values.append(math.nan if value is None else float(value))
        categories.append(category)
    if not texts:
        raise DataError(f"{items_path}: the catalog has no valid items")

    labelled = [o for o in objectives[1:]]
    rows: dict[str, list[tuple[float, int, list[float]]]] = {}
    inter_path = folder / INTERACTIONS_FILE
    timed: bool | None = None  # every row has a timestamp, or none has (then the line order is the order)
    for lineno, obj in _read_jsonl(inter_path, lenient, skipped):
        where = f"{inter_path}:{lineno}"
        try:
            user = _field(obj, "user_id", "str", where)
            item = _field(obj, "item_id", "str", where)
            ts = _field(obj, "timestamp", "number", where, required=False)
            if timed is None:
                timed = ts is not None
            if (ts is not None) != timed:
                raise DataError(
                    f"{where}: field 'timestamp' is {'missing' if timed else 'given'}, but the first row "
                    f"{'has one' if timed else 'has none'}: give a timestamp on every row or on none "
                    "(then the order of the lines is the order of each user's interactions)"
                )
            ts = ts if timed else lineno
            if item not in item_index:
                raise DataError(f"{where}: field 'item_id' {item!r} is not in {ITEMS_FILE}")
            labs = [_field(obj, o, "label", where, required=False) for o in labelled]
        except DataError as exc:
            if not lenient:
                raise
            _count_skip(skipped, INTERACTIONS_FILE, exc)
            continue
        rows.setdefault(user, []).append(
            (float(ts), item_index[item], [math.nan if v is None else float(v) for v in labs])
        )
    if not rows:
        raise DataError(f"{inter_path}: the log has no valid interactions")

    users = sorted(rows, key=natural_key)
    sequences: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    labels: dict[str, list[np.ndarray]] = {o: [] for o in labelled}
    item_ids = list(item_index)
    for user in users:
        events = sorted(rows[user], key=lambda r: (r[0], natural_key(item_ids[r[1]])))  # time, then item id
        sequences.append(np.asarray([e[1] for e in events], dtype=np.int64))
        stamps.append(np.asarray([e[0] for e in events], dtype=np.float64))
        for j, o in enumerate(labelled):
            labels[o].append(np.asarray([e[2][j] for e in events], dtype=np.float32))
    impressions = None
    if (folder / IMPRESSIONS_FILE).is_file():
        if not timed:
            raise DataError(
                f"{inter_path}: impressions need a timestamp on every interaction (the history before each)"
            )
        impressions = _load_impressions(folder / IMPRESSIONS_FILE, item_index, users, stamps, lenient, skipped)
    return Scenario(
        name=name,
        objectives=tuple(objectives),
        item_ids=item_ids,
        texts=texts,
        users=users,
        sequences=sequences,
        labels=labels,
        categories=None if all(c is None for c in categories) else categories,
        values=None if all(math.isnan(v) for v in values) else np.asarray(values, dtype=np.float32),
        skipped=dict(skipped),
        impressions=impressions,
        order="timestamp" if timed else "line order",
    )


def _load_impressions(
    path: Path,
    item_index: dict[str, int],
    users: list[str],
    stamps: list[np.ndarray],
    lenient: bool,
    skipped: Counter[str],
) -> ImpressionLog:
    """Validate ``impressions.jsonl`` against the catalog and the (time-ordered) log."""
    user_index = {u: i for i, u in enumerate(users)}
    seen: set[int] = set()
    ids, owners, times, lengths, candidates, clicks = [], [], [], [], [], []
    for lineno, obj in _read_jsonl(path, lenient, skipped):
        where = f"{path}:{lineno}"
        try:
            imp = obj.get("impression_id")
            if isinstance(imp, bool) or not isinstance(imp, int) or imp < 0:
                raise DataError(f"{where}: field 'impression_id' must be an integer >= 0, got {imp!r}")
            if imp in seen:
                raise DataError(f"{where}: field 'impression_id' {imp} repeats an earlier impression")
            user = _field(obj, "user_id", "str", where)
            ts = float(_field(obj, "timestamp", "number", where))
            cands, labs = obj.get("candidates"), obj.get("clicks")
            if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
                raise DataError(f"{where}: field 'candidates' must be a non-empty list of item ids")
            unknown = [c for c in cands if c not in item_index]
            if unknown:
                raise DataError(f"{where}: field 'candidates' item {unknown[0]!r} is not in {ITEMS_FILE}")
            if (
                not isinstance(labs, list)
                or len(labs) != len(cands)
                or any(isinstance(v, bool) or v not in (0, 1) for v in labs)
            ):
                raise DataError(f"{where}: field 'clicks' must be a list of 0/1, one per candidate")
            if user not in user_index:
                raise DataError(f"{where}: field 'user_id' {user!r} has no interactions (empty history)")
            history = int(np.searchsorted(stamps[user_index[user]], ts, side="left"))
            if history == 0:
                raise DataError(f"{where}: field 'timestamp' {ts:g}: user {user!r} has no earlier interaction")
        except DataError as exc:
            if not lenient:
                raise
            _count_skip(skipped, IMPRESSIONS_FILE, exc)
            continue
        seen.add(imp)
        ids.append(imp)
        owners.append(user_index[user])
        times.append(ts)
        lengths.append(history)
        candidates.append(np.asarray([item_index[c] for c in cands], dtype=np.int64))
        clicks.append(np.asarray(labs, dtype=np.int64))
    if not ids:
        raise DataError(f"{path}: no valid impressions")
    return ImpressionLog(
        impression_ids=np.asarray(ids, dtype=np.int64),
        users=np.asarray(owners, dtype=np.int64),
        timestamps=np.asarray(times, dtype=np.float64),
        history_lengths=np.asarray(lengths, dtype=np.int64),
        candidates=candidates,
        clicks=clicks,
    )


def occupied(folder: Path) -> bool:
    """Whether writing ``folder`` would replace something: a file, or a folder that is not empty."""
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def write_scenario(
    folder: str | os.PathLike[str], scenario: Scenario, timestamps: list[np.ndarray], force: bool = False
) -> None:
    """Write a scenario in the canonical format, atomically (a temp folder renamed into place). An existing
    non-empty ``folder`` is replaced only with ``force``; a scenario without items or interactions is
    refused. Nothing is written when either check fails."""
    folder = Path(folder)
    if scenario.num_items == 0 or scenario.num_interactions == 0:
        raise ValueError(
            f"scenario '{scenario.name}' has {scenario.num_items} items and {scenario.num_interactions} "
            f"interactions: nothing to write to {folder} (check the source files, or the rows --lenient skipped)"
        )
    if occupied(folder) and not force:
        raise FileExistsError(f"{folder} already exists and is not empty: nothing written (pass --force to replace it)")
    with atomic_folder(folder) as tmp:
        meta = {"name": scenario.name, "objectives": list(scenario.objectives)}
        (tmp / SCENARIO_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        with (tmp / ITEMS_FILE).open("w", encoding="utf-8") as fh:
            for i, (item_id, text) in enumerate(zip(scenario.item_ids, scenario.texts, strict=True)):
                record: dict[str, Any] = {"item_id": item_id, "text": text}
                if scenario.categories is not None and scenario.categories[i] is not None:
                    record["category"] = scenario.categories[i]
                if scenario.values is not None and not math.isnan(scenario.values[i]):
                    record["value"] = float(scenario.values[i])
                fh.write(json.dumps(record) + "\n")
        with (tmp / INTERACTIONS_FILE).open("w", encoding="utf-8") as fh:
            for u, user in enumerate(scenario.users):
                for j, item in enumerate(scenario.sequences[u]):
                    row: dict[str, Any] = {
                        "user_id": user,
                        "item_id": scenario.item_ids[item],
                        "timestamp": int(timestamps[u][j]),
                    }
                    for o, lab in scenario.labels.items():
                        if not math.isnan(lab[u][j]):
                            row[o] = int(lab[u][j])
                    fh.write(json.dumps(row) + "\n")
        log = scenario.impressions
        if log is not None:
            with (tmp / IMPRESSIONS_FILE).open("w", encoding="utf-8") as fh:
                for m, imp in enumerate(log.impression_ids):
                    ts = float(log.timestamps[m])
                    impression = {
                        "impression_id": int(imp),
                        "user_id": scenario.users[log.users[m]],
                        "timestamp": int(ts) if ts.is_integer() else ts,
                        "candidates": [scenario.item_ids[i] for i in log.candidates[m]],
                        "clicks": [int(c) for c in log.clicks[m]],
                    }
                    fh.write(json.dumps(impression) + "\n")
