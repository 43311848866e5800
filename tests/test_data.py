import json
from pathlib import Path

import numpy as np
import pytest

from shared.data import DataError, leave_one_out, load_scenario, write_scenario
from shared.demo import demo_federation


def make_scenario(folder: Path, items: list[str], interactions: list[str], objectives=("engagement", "satisfaction")):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scenario.json").write_text(json.dumps({"name": "s", "objectives": list(objectives)}))
    (folder / "items.jsonl").write_text("\n".join(items) + "\n")
    (folder / "interactions.jsonl").write_text("\n".join(interactions) + "\n")
    return folder


ITEMS = ['{"item_id": "a", "text": "alpha"}', '{"item_id": "b", "text": "beta"}', '{"item_id": "c", "text": "gamma"}']
GOOD = [
    '{"user_id": "u1", "item_id": "b", "timestamp": 2, "satisfaction": 1}',
    '{"user_id": "u1", "item_id": "a", "timestamp": 1}',
    '{"user_id": "u1", "item_id": "c", "timestamp": 2, "satisfaction": 0}',
    '{"user_id": "u2", "item_id": "a", "timestamp": 5}',
]


def test_load_orders_by_time_then_item_id(tmp_path):
    sc = load_scenario(make_scenario(tmp_path / "s", ITEMS, GOOD))
    assert sc.item_ids == ["a", "b", "c"]
    assert sc.users == ["u1", "u2"]
    assert sc.sequences[0].tolist() == [0, 1, 2]  # b and c tie at t=2: item id order
    np.testing.assert_array_equal(sc.labels["satisfaction"][0], [np.nan, 1, 0])
    split = leave_one_out(sc)
    assert split.train[0].tolist() == [0] and split.valid_target.tolist() == [1] and split.test_target.tolist() == [2]
    assert split.eval_users.tolist() == [0] and split.train[1].tolist() == [0]  # u2 too short: train only


def test_a_log_without_timestamps_is_ordered_by_its_lines_and_says_so(tmp_path):
    unordered = [
        line.replace(', "timestamp": 2', "").replace(', "timestamp": 1', "").replace(', "timestamp": 5', "")
        for line in GOOD
    ]
    assert all("timestamp" not in line for line in unordered)
    sc = load_scenario(make_scenario(tmp_path / "s", ITEMS, unordered))
    assert sc.order == "line order" and load_scenario(make_scenario(tmp_path / "t", ITEMS, GOOD)).order == "timestamp"
    assert sc.sequences[0].tolist() == [1, 0, 2]  # b, a, c: the lines' order
    np.testing.assert_array_equal(sc.labels["satisfaction"][0], [1, np.nan, 0])
    split = leave_one_out(sc)
    assert split.valid_target.tolist() == [0] and split.test_target.tolist() == [2]
    mixed = [GOOD[0], unordered[1]]
    with pytest.raises(
        DataError, match=r"interactions.jsonl:2: field 'timestamp' is missing, but the first row has one"
    ):
        load_scenario(make_scenario(tmp_path / "m", ITEMS, mixed))


@pytest.mark.parametrize(
    ("file", "lines", "message"),
    [
        ("items", ITEMS[:1] + ['{"item_id": "b"}'], r"items.jsonl:2: field 'text' is missing"),
        ("items", ITEMS[:1] + ['{"item_id": "b", "text": ""}'], r"items.jsonl:2: field 'text' must be a non-empty"),
        ("items", ITEMS[:1] + ['{"item_id": "a", "text": "x"}'], r"items.jsonl:2: field 'item_id' 'a' repeats"),
        ("items", ITEMS[:1] + ['{"item_id": "b", "text": "x", "value": "cheap"}'], r"items.jsonl:2: field 'value'"),
        ("items", ITEMS[:2] + ["{not json"], r"items.jsonl:3: malformed JSON"),
        (
            "interactions",
            GOOD[:2] + ['{"user_id": "u1", "item_id": "zzz", "timestamp": 3}'],
            r"interactions.jsonl:3: field 'item_id' 'zzz' is not in items.jsonl",
        ),
        (
            "interactions",
            ['{"user_id": "u1", "item_id": "a", "timestamp": "soon"}'],
            r"interactions.jsonl:1: field 'timestamp' must be a finite number",
        ),
        (
            "interactions",
            ['{"user_id": "u1", "item_id": "a", "timestamp": NaN}'],
            r"interactions.jsonl:1: field 'timestamp' must be a finite number",
        ),
        (
            "interactions",
            GOOD[:1] + ['{"user_id": "u1", "item_id": "a", "timestamp": 1, "satisfaction": 0.5}'],
            r"interactions.jsonl:2: field 'satisfaction' must be 0 or 1",
        ),
        ("interactions", ["[1, 2]"], r"interactions.jsonl:1: malformed JSON line \(not a JSON object\)"),
        ("interactions", ['{"item_id": "a", "timestamp": 1}'], r"interactions.jsonl:1: field 'user_id' is missing"),
    ],
)
def test_malformed_files_name_file_line_and_field(tmp_path, file, lines, message):
    items, inter = (lines, GOOD) if file == "items" else (ITEMS, lines)
    with pytest.raises(DataError, match=message):
        load_scenario(make_scenario(tmp_path / "s", items, inter))


def test_lenient_skips_and_reports(tmp_path):
    inter = GOOD + ['{"user_id": "u3", "item_id": "zzz", "timestamp": 1}', "{broken", '{"user_id": "u3"}']
    sc = load_scenario(make_scenario(tmp_path / "s", ITEMS, inter), lenient=True)
    assert sc.num_interactions == 4
    assert sum(sc.skipped.values()) == 3
    assert any("malformed JSON" in k for k in sc.skipped)


def test_missing_files_and_empty_catalog(tmp_path):
    with pytest.raises(DataError, match="scenario.json: file not found"):
        load_scenario(tmp_path)
    with pytest.raises(DataError, match="catalog has no valid items"):
        load_scenario(make_scenario(tmp_path / "e", [""], GOOD))


def test_demo_round_trips_exactly_through_the_canonical_format(tmp_path):
    scenarios = demo_federation(seed=3)
    again = demo_federation(seed=3)
    for name, (sc, stamps) in scenarios.items():
        write_scenario(tmp_path / name, sc, stamps)
        loaded = load_scenario(tmp_path / name)
        assert loaded.item_ids == sc.item_ids and loaded.texts == sc.texts and loaded.categories == sc.categories
        assert [s.tolist() for s in loaded.sequences] == [s.tolist() for s in sc.sequences]
        for key in sc.labels:
            for a, b in zip(loaded.labels[key], sc.labels[key], strict=True):
                np.testing.assert_array_equal(a, b)
        assert again[name][0].texts == sc.texts  # deterministic
    assert not list(tmp_path.glob(".*"))  # no temp folders left


NEWS_ITEMS = [
    '{"item_id": "N1", "text": "one"}',
    '{"item_id": "N2", "text": "two"}',
    '{"item_id": "N3", "text": "three"}',
]
NEWS_LOG = [
    '{"user_id": "I13", "item_id": "N1", "timestamp": 0}',
    '{"user_id": "I13", "item_id": "N2", "timestamp": 1}',  # the click of impression 13 (train)
    '{"user_id": "I20", "item_id": "N2", "timestamp": 0}',
    '{"user_id": "I20", "item_id": "N3", "timestamp": 1}',  # the click of impression 20 (test): never trained on
    '{"user_id": "I22", "item_id": "N3", "timestamp": 0}',
]
NEWS_IMPRESSIONS = [
    '{"impression_id": 13, "user_id": "I13", "timestamp": 1, "candidates": ["N2", "N3"], "clicks": [1, 0]}',
    '{"impression_id": 20, "user_id": "I20", "timestamp": 1, "candidates": ["N1", "N3"], "clicks": [0, 1]}',
    '{"impression_id": 22, "user_id": "I22", "timestamp": 5, "candidates": ["N1", "N2", "N3"], "clicks": [1, 0, 1]}',
]


def news_folder(folder: Path, impressions: list[str]) -> Path:
    make_scenario(folder, NEWS_ITEMS, NEWS_LOG, objectives=("engagement",))
    (folder / "impressions.jsonl").write_text("\n".join(impressions) + "\n")
    return folder


def test_impressions_split_by_id_and_evaluation_users_are_never_trained_on(tmp_path):
    sc = load_scenario(news_folder(tmp_path / "n", NEWS_IMPRESSIONS))
    log = sc.impressions
    assert log is not None and log.impression_ids.tolist() == [13, 20, 22]
    assert log.history_lengths.tolist() == [1, 1, 1]  # interactions strictly before the impression
    assert log.positions("train").tolist() == [0] and log.positions("test").tolist() == [1]
    assert log.positions("valid").tolist() == [2]
    split = leave_one_out(sc)
    assert [sc.users[u] for u in split.eval_users] == ["I20", "I22"]
    assert [len(t) for t in split.train] == [2, 0, 0]  # I13 trains on history + click; I20, I22 nothing
    assert split.test_target.tolist() == [2, -1] and split.valid_target.tolist() == [-1, 0]  # first clicks
    assert split.valid_impressions.tolist() == [2] and split.test_impressions.tolist() == [1]
    write_scenario(tmp_path / "again", sc, [np.arange(len(s), dtype=float) for s in sc.sequences])
    again = load_scenario(tmp_path / "again").impressions
    assert again is not None and [c.tolist() for c in again.candidates] == [c.tolist() for c in log.candidates]
    with pytest.raises(ValueError, match="unknown split"):
        log.positions("dev")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"impression_id": 13, "user_id": "I13", "timestamp": 1, "candidates": ["N9"], "clicks": [1]}',
            "'candidates' item 'N9' is not in items.jsonl",
        ),
        (
            '{"impression_id": 13, "user_id": "I13", "timestamp": 1, "candidates": ["N1"], "clicks": [1, 0]}',
            "'clicks' must be a list of 0/1",
        ),
        (
            '{"impression_id": 13, "user_id": "I13", "timestamp": 1, "candidates": [], "clicks": []}',
            "'candidates' must be a non-empty",
        ),
        (
            '{"impression_id": -1, "user_id": "I13", "timestamp": 1, "candidates": ["N1"], "clicks": [1]}',
            "'impression_id' must be an integer",
        ),
        (
            '{"impression_id": 13, "user_id": "I13", "timestamp": 0, "candidates": ["N1"], "clicks": [1]}',
            "'timestamp' 0: user 'I13' has no earlier interaction",
        ),
        (
            '{"impression_id": 13, "user_id": "nobody", "timestamp": 1, "candidates": ["N1"], "clicks": [1]}',
            "'user_id' 'nobody' has no interactions",
        ),
        (
            '{"impression_id": 13, "user_id": "I13", "candidates": ["N1"], "clicks": [1]}',
            "'timestamp' is missing",
        ),
        (NEWS_IMPRESSIONS[0].replace('"N2", "N3"', '"N2", 3'), "'candidates' must be a non-empty list of item ids"),
    ],
)
def test_malformed_impressions_name_file_line_and_field(tmp_path, line, message):
    with pytest.raises(DataError, match=r"impressions.jsonl:2: field " + message.replace("(", r"\(")):
        load_scenario(news_folder(tmp_path / "n", [NEWS_IMPRESSIONS[1], line]))


def test_impressions_repeated_id_and_lenient_mode(tmp_path):
    folder = news_folder(tmp_path / "n", NEWS_IMPRESSIONS + [NEWS_IMPRESSIONS[0]])
    with pytest.raises(DataError, match=r"impressions.jsonl:4: field 'impression_id' 13 repeats"):
        load_scenario(folder)
    bad = '{"impression_id": 30, "user_id": "I13", "timestamp": 0, "candidates": ["N1"], "clicks": [1]}'
    sc = load_scenario(news_folder(tmp_path / "m", NEWS_IMPRESSIONS + [bad, "{oops"]), lenient=True)
    assert sc.impressions is not None and len(sc.impressions.impression_ids) == 3
    assert sum(v for k, v in sc.skipped.items() if k.startswith("impressions.jsonl")) == 2


def test_wrong_encoding_names_file_and_line(tmp_path):
    folder = make_scenario(tmp_path / "s", ITEMS, GOOD)
    (folder / "items.jsonl").write_bytes(
        (ITEMS[0] + "\n").encode() + '{"item_id": "b", "text": "caf\xe9"}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match=r"items.jsonl:2: not valid utf-8 text \(byte b'\\xe9'\)"):
        load_scenario(folder)
