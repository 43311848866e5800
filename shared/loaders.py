"""Public recommendation datasets -> canonical scenarios (:class:`shared.data.Scenario`).

Every loader validates its input and names file, line and field on error; ``lenient=True`` skips
bad rows and records how many were skipped and why in ``Scenario.skipped``. Each returns the
scenario and per-interaction timestamps (for :func:`shared.data.write_scenario`).

- MovieLens ``ml-latest-small`` (``ratings.csv``, ``movies.csv``, ``tags.csv``) and ``ml-100k``
  (``u.data``, ``u.item`` in latin-1): item text = title, genres (and tags where present);
  engagement = rated, satisfaction = rating >= 4. The catalog is the rated movies.
- Amazon in UniSRec format (``*.text``, ``*.item2index``, ``*.{train,valid,test}.inter``): item text
  as given; sequences rebuilt from the ``.inter`` files so that leave-one-out reproduces their split.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import DataError, ImpressionLog, Scenario, encoding_error, impression_positions, natural_key

Loaded = tuple[Scenario, list[np.ndarray]]


def _rows(path: Path, *, delimiter: str, encoding: str = "utf-8", header: bool) -> Iterator[tuple[int, list[str]]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(encoding=encoding, newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
        try:
            for lineno, row in enumerate(reader, start=1):
                if header and lineno == 1:
                    continue
                if row:
                    yield lineno, row
        except UnicodeDecodeError:
            raise encoding_error(path, encoding) from None


def _parse(where: str, name: str, value: str, kind: Callable[[str], float | int]) -> float | int:
    try:
        out = kind(value)
    except ValueError:
        raise DataError(f"{where}: field '{name}' = {value!r} is not a valid {kind.__name__}") from None
    if isinstance(out, float) and not math.isfinite(out):
        raise DataError(f"{where}: field '{name}' = {value!r} is not finite")
    return out


def _guard(lenient: bool, skipped: Counter[str], exc: DataError) -> None:
    if not lenient:
        raise exc
    skipped[str(exc).split(": ", 1)[1].split(" = ")[0]] += 1


def _build(
    name: str,
    texts: dict[str, str],
    events: dict[str, list[tuple[float, str, float]]],
    skipped: Counter[str],
    satisfaction: bool,
) -> Loaded:
    """Scenario from per-user (timestamp, item id, rating) events; catalog = rated items with text."""
    rated = sorted({item for evs in events.values() for _, item, _ in evs}, key=natural_key)
    index = {item: i for i, item in enumerate(rated)}
    users = sorted(events, key=natural_key)
    sequences, stamps, labels = [], [], []
    for user in users:
        evs = sorted(events[user], key=lambda e: (e[0], natural_key(e[1])))  # time, ties by item id
        sequences.append(np.asarray([index[i] for _, i, _ in evs], dtype=np.int64))
        stamps.append(np.asarray([t for t, _, _ in evs], dtype=np.float64))
        labels.append(np.asarray([1.0 if r >= 4 else 0.0 for _, _, r in evs], dtype=np.float32))
    scenario = Scenario(
        name=name,
        objectives=("engagement", "satisfaction") if satisfaction else ("engagement",),
        item_ids=rated,
        texts=[texts[i] for i in rated],
        users=users,
        sequences=sequences,
        labels={"satisfaction": labels} if satisfaction else {},
        skipped=dict(skipped),
    )
    return scenario, stamps


def _rating_events(
    path: Path,
    delimiter: str,
    header: bool,
    columns: tuple[str, str, str, str],
    rating_kind: Callable[[str], float | int],
    catalog_file: str,
    texts: dict[str, str],
    lenient: bool,
    skipped: Counter[str],
) -> dict[str, list[tuple[float, str, float]]]:
    """Per user: (timestamp, item id, rating) from a user/item/rating/timestamp file; items must be in ``texts``."""
    events: dict[str, list[tuple[float, str, float]]] = {}
    for lineno, row in _rows(path, delimiter=delimiter, header=header):
        where = f"{path}:{lineno}"
        try:
            if len(row) != 4:
                raise DataError(f"{where}: expected {', '.join(columns)}, got {len(row)} fields")
            rating = float(_parse(where, columns[2], row[2], rating_kind))
            ts = float(_parse(where, columns[3], row[3], int))
            if row[1] not in texts:
                raise DataError(f"{where}: field '{columns[1]}' = {row[1]!r} is not in {catalog_file}")
        except DataError as exc:
            _guard(lenient, skipped, exc)
            continue
        events.setdefault(row[0], []).append((ts, row[1], rating))
    if not events:
        raise DataError(f"{path}: no valid ratings")
    return events


def load_movielens_latest(
    folder: str | Path, *, lenient: bool = False, tags: bool = True, name: str = "movies"
) -> Loaded:
    """``ml-latest-small``: text = "title. genre, genre[. tags: t, t]"; catalog = rated movies."""
    folder, skipped = Path(folder), Counter[str]()
    texts: dict[str, str] = {}
    for lineno, row in _rows(folder / "movies.csv", delimiter=",", header=True):
        where = f"{folder / 'movies.csv'}:{lineno}"
        try:
            if len(row) != 3 or not row[0].isdigit() or not row[1].strip():
                raise DataError(f"{where}: expected movieId,title,genres with an integer id and a title, got {row!r}")
        except DataError as exc:
            _guard(lenient, skipped, exc)
            continue
        genres = "" if row[2] == "(no genres listed)" else ", ".join(row[2].split("|"))
        texts[row[0]] = f"{row[1].strip()}. {genres}" if genres else row[1].strip()
    if tags and (folder / "tags.csv").is_file():
        movie_tags: dict[str, list[str]] = {}
        for lineno, row in _rows(folder / "tags.csv", delimiter=",", header=True):
            if (
                len(row) == 4
                and row[1] in texts
                and row[2].strip()
                and row[2].strip() not in movie_tags.get(row[1], [])
            ):
                movie_tags.setdefault(row[1], []).append(row[2].strip())
            elif len(row) != 4:
                _guard(
                    lenient, skipped, DataError(f"{folder / 'tags.csv'}:{lineno}: expected 4 fields, got {len(row)}")
                )
        for movie, tag_list in movie_tags.items():
            texts[movie] += f". tags: {', '.join(tag_list)}"
    events = _rating_events(
        folder / "ratings.csv",
        ",",
        True,
        ("userId", "movieId", "rating", "timestamp"),
        float,
        "movies.csv",
        texts,
        lenient,
        skipped,
    )
    return _build(name, texts, events, skipped, satisfaction=True)


def load_movielens_100k(folder: str | Path, *, lenient: bool = False, name: str = "movies") -> Loaded:
    """``ml-100k``: text = "title. genre, genre" from ``u.item`` (latin-1) and ``u.genre``."""
    folder, skipped = Path(folder), Counter[str]()
    genre_names = [row[0] for _, row in _rows(folder / "u.genre", delimiter="|", encoding="latin-1", header=False)]
    texts: dict[str, str] = {}
    for lineno, row in _rows(folder / "u.item", delimiter="|", encoding="latin-1", header=False):
        where = f"{folder / 'u.item'}:{lineno}"
        try:
            if len(row) != 5 + len(genre_names) or not row[0].isdigit() or not row[1].strip():
                raise DataError(f"{where}: expected id|title|...|{len(genre_names)} genre flags, got {len(row)} fields")
        except DataError as exc:
            _guard(lenient, skipped, exc)
            continue
        genres = [g for g, flag in zip(genre_names, row[5:], strict=True) if flag == "1" and g != "unknown"]
        texts[row[0]] = f"{row[1].strip()}. {', '.join(genres)}" if genres else row[1].strip()
    events = _rating_events(
        folder / "u.data",
        "\t",
        False,
        ("user_id", "item_id", "rating", "timestamp"),
        int,
        "u.item",
        texts,
        lenient,
        skipped,
    )
    return _build(name, texts, events, skipped, satisfaction=True)


def load_amazon_unisrec(folder: str | Path, prefix: str = "Scientific", *, name: str = "ecommerce") -> Loaded:
    """UniSRec format; sequences rebuilt so that leave-one-out gives exactly its valid/test rows."""
    folder = Path(folder)
    asin_index: dict[str, int] = {}
    for lineno, row in _rows(folder / f"{prefix}.item2index", delimiter="\t", header=False):
        if len(row) != 2 or not row[1].isdigit():
            raise DataError(f"{folder / f'{prefix}.item2index'}:{lineno}: expected ASIN<TAB>index, got {row!r}")
        asin_index[row[0]] = int(row[1])
    texts: list[str | None] = [None] * len(asin_index)
    for lineno, row in _rows(folder / f"{prefix}.text", delimiter="\t", header=True):
        where = f"{folder / f'{prefix}.text'}:{lineno}"
        if len(row) != 2 or row[0] not in asin_index or not row[1].strip():
            raise DataError(f"{where}: field 'item_id' {row[0]!r} unknown or text empty")
        texts[asin_index[row[0]]] = row[1].strip()
    missing = [i for i, t in enumerate(texts) if t is None]
    if missing:
        raise DataError(f"{folder / f'{prefix}.text'}: no text for item indices {missing[:5]}")

    def inter(split: str) -> dict[int, list[tuple[list[int], int]]]:
        out: dict[int, list[tuple[list[int], int]]] = {}
        path = folder / f"{prefix}.{split}.inter"
        for lineno, row in _rows(path, delimiter="\t", header=True):
            where = f"{path}:{lineno}"
            try:
                history = [int(x) for x in row[1].split()]
                user, target = int(row[0]), int(row[2])
            except (ValueError, IndexError):
                raise DataError(f"{where}: expected user<TAB>history<TAB>target as integers, got {row!r}") from None
            if not history or max(history + [target]) >= len(texts) or min(history + [target]) < 0:
                raise DataError(f"{where}: field 'item_id' has an index outside item2index")
            out.setdefault(user, []).append((history, target))
        return out

    train, valid, test = inter("train"), inter("valid"), inter("test")
    users = sorted(test)
    sequences = []
    for u in users:
        prefixes = train.get(u, [])[::-1]  # the file lists a user's rows latest target first
        first = prefixes[0][0][:1] if prefixes else valid[u][0][0][-1:]
        seq = first + [t for _, t in prefixes] + [valid[u][0][1], test[u][0][1]]
        if seq[-51:-1] != test[u][0][0][-50:]:
            raise DataError(f"{folder / f'{prefix}.test.inter'}: user {u}: history does not match the training rows")
        sequences.append(np.asarray(seq, dtype=np.int64))
    ids = sorted(asin_index, key=asin_index.__getitem__)
    scenario = Scenario(
        name=name,
        objectives=("engagement",),
        item_ids=ids,
        texts=[str(t) for t in texts],
        users=[str(u) for u in users],
        sequences=sequences,
        labels={},
    )
    return scenario, [np.arange(len(s), dtype=np.float64) for s in sequences]


@dataclass
class Impressions:
    """MIND-style news data: a catalog and impressions (history + candidates with click labels)."""

    item_ids: list[str]
    texts: list[str]
    impression_ids: list[int]
    histories: list[np.ndarray]  # item rows, oldest first (may be empty)
    candidates: list[np.ndarray]  # item rows
    clicks: list[np.ndarray]  # 0/1 per candidate
    skipped: dict[str, int] = field(default_factory=dict)  # lenient mode: reason -> rows skipped

    def split(self, name: str) -> list[int]:
        """Impression positions of a split: id mod 10 in {0, 1} test, {2} validation, the rest train."""
        return impression_positions(np.asarray(self.impression_ids, dtype=np.int64), name).tolist()


def load_mind(folder: str | Path, *, lenient: bool = False) -> Impressions:
    """``news.tsv`` + ``behaviors.tsv``: text = "category. subcategory. title. abstract"."""
    folder, skipped = Path(folder), Counter[str]()
    index: dict[str, int] = {}
    texts: list[str] = []
    path = folder / "news.tsv"
    for lineno, row in _rows(path, delimiter="\t", header=False):
        try:
            if len(row) < 5 or not row[0] or not row[3].strip():
                raise DataError(f"{path}:{lineno}: expected news_id, category, subcategory, title, abstract, ...")
        except DataError as exc:
            _guard(lenient, skipped, exc)
            continue
        index[row[0]] = len(texts)
        texts.append(". ".join(part.strip() for part in row[1:5] if part.strip()))
    imp_ids, histories, candidates, clicks = [], [], [], []
    path = folder / "behaviors.tsv"
    for lineno, row in _rows(path, delimiter="\t", header=False):
        where = f"{path}:{lineno}"
        try:
            if len(row) != 5:
                raise DataError(f"{where}: expected impression_id, user_id, time, history, impressions")
            imp = int(_parse(where, "impression_id", row[0], int))
            history = row[3].split()
            cands = [c.rsplit("-", 1) for c in row[4].split()]
            unknown = [n for n in history + [c[0] for c in cands] if n not in index]
            if unknown:
                raise DataError(f"{where}: field 'history/impressions' news id {unknown[0]!r} is not in news.tsv")
            if not cands or any(len(c) != 2 or c[1] not in ("0", "1") for c in cands):
                raise DataError(f"{where}: field 'impressions' must be news_id-0/1 entries")
            if not history:
                raise DataError(f"{where}: field 'history' is empty (the user model needs at least one click)")
        except DataError as exc:
            _guard(lenient, skipped, exc)
            continue
        imp_ids.append(imp)
        histories.append(np.asarray([index[n] for n in history], dtype=np.int64))
        candidates.append(np.asarray([index[c[0]] for c in cands], dtype=np.int64))
        clicks.append(np.asarray([int(c[1]) for c in cands], dtype=np.int64))
    return Impressions(list(index), texts, imp_ids, histories, candidates, clicks, dict(skipped))


def mind_scenario(imp: Impressions, name: str = "news") -> Loaded:
    """A canonical impression scenario: one pseudo-user ``I<impression id>`` per impression (the sample has
    no user ids), whose log is the impression's history (timestamps 0..h-1, oldest first) and its clicks
    (timestamp h, the impression's time); engagement is the only objective."""
    users = [f"I{i}" for i in imp.impression_ids]
    if len(set(users)) != len(users):
        raise DataError("behaviors.tsv: impression ids repeat")
    sequences, stamps = [], []
    for history, cands, clicks in zip(imp.histories, imp.candidates, imp.clicks, strict=True):
        clicked = np.asarray(sorted(cands[clicks == 1], key=lambda i: natural_key(imp.item_ids[i])), dtype=np.int64)
        sequences.append(np.concatenate([history, clicked]).astype(np.int64))
        stamps.append(np.concatenate([np.arange(len(history)), np.full(len(clicked), len(history))]).astype(float))
    order = sorted(range(len(users)), key=lambda u: natural_key(users[u]))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    log = ImpressionLog(
        impression_ids=np.asarray(imp.impression_ids, dtype=np.int64),
        users=rank,
        timestamps=np.asarray([len(h) for h in imp.histories], dtype=np.float64),
        history_lengths=np.asarray([len(h) for h in imp.histories], dtype=np.int64),
        candidates=list(imp.candidates),
        clicks=list(imp.clicks),
    )
    scenario = Scenario(
        name=name,
        objectives=("engagement",),
        item_ids=list(imp.item_ids),
        texts=list(imp.texts),
        users=[users[u] for u in order],
        sequences=[sequences[u] for u in order],
        labels={},
        skipped=dict(imp.skipped),
        impressions=log,
    )
    return scenario, [stamps[u] for u in order]


PUBLIC_FORMATS = ("movielens", "ml-100k", "amazon", "mind")


def load_public(fmt: str, src: str | Path, *, name: str | None = None, lenient: bool = False) -> Loaded:
    """A public dataset folder through its validating loader: ``movielens`` (ml-latest-small), ``ml-100k``,
    ``amazon`` (UniSRec, ``Scientific`` prefix) or ``mind``; default names movies / ecommerce / news."""
    if fmt == "amazon":
        if lenient:
            raise ValueError("lenient: the UniSRec files must match each other exactly; fix them instead")
        return load_amazon_unisrec(src, name=name or "ecommerce")
    if fmt == "movielens":
        return load_movielens_latest(src, lenient=lenient, name=name or "movies")
    if fmt == "ml-100k":
        return load_movielens_100k(src, lenient=lenient, name=name or "movies")
    if fmt == "mind":
        return mind_scenario(load_mind(src, lenient=lenient), name=name or "news")
    raise ValueError(f"unknown dataset format {fmt!r} (known: {', '.join(PUBLIC_FORMATS)})")
