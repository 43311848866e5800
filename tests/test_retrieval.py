"""Two-stage serving for large catalogs: an HNSW index retrieves candidates by the ranking objective, the
head re-ranks them. On the demo catalog (240 items) the index is searched exhaustively, so the two stages
must serve exactly what scoring every item serves; with fewer candidates than items, the top of the
ranking objective is still exact, private biases included."""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pytest
from test_private_memory import served_video_model

from client.serving import Recommender, Request, hnsw_index, retrieval_vectors
from client.state import PRIVATE_FILE, save_private
from shared.checkpoint import save_checkpoint
from shared.config import ServeConfig
from shared.records import trainable_state

USERS = ("video-user-0001", "video-user-0004", "video-user-0100", "video-user-0300")


@pytest.fixture()
def checkpoint(tiny_cfg, demo_dir, tmp_path):
    """A non-trivial model with a private memory whose biases reorder items (the index must follow them)."""
    model, data = served_video_model(tiny_cfg, demo_dir)
    folder = save_checkpoint(tmp_path / "run", 1, trainable_state(model), tiny_cfg, {})
    save_private(model, tmp_path / "run" / "clients" / "video" / PRIVATE_FILE, "video", data.scenario.item_ids)
    return folder


def served(rec: Recommender, **request) -> list[tuple[str, float]]:
    return [(i["item_id"], i["score"]) for i in rec.recommend(Request(scenario="video", **request))]


def test_two_stages_serve_what_scoring_every_item_serves(checkpoint, demo_dir, tmp_path):
    exact = Recommender(checkpoint, [demo_dir / "video"], tmp_path / "cache", ServeConfig(ann_min_items=0))
    assert exact.catalogs["video"].ann is None
    everything = ServeConfig(ann_min_items=1, ann_candidates=240)
    two = Recommender(checkpoint, [demo_dir / "video"], tmp_path / "cache", everything)
    assert two.catalogs["video"].ann is not None and two.catalogs["video"].ann.ntotal == 240
    cases = [
        {"k": 10},
        {"k": 20, "diversity": 0.3},
        {"k": 10, "weights": {"engagement": 0.2, "satisfaction": 0.8}},
        {"k": 50, "exclude_seen": True},
    ]
    for user in USERS:
        for case in cases:
            a, b = served(exact, user_id=user, **case), served(two, user_id=user, **case)
            assert [i for i, _ in a] == [i for i, _ in b], (user, case)
            assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-6)

    # 30 candidates of 240: the ranking objective's top 10 (text, residual and private bias) is still exact
    few = Recommender(
        checkpoint, [demo_dir / "video"], tmp_path / "cache", dataclasses.replace(everything, ann_candidates=30)
    )
    for user in USERS:
        assert [i for i, _ in served(few, user_id=user, k=10)] == [i for i, _ in served(exact, user_id=user, k=10)]
        seen = set(exact.catalogs["video"].scenario.item_ids[j] for j in exact.catalogs["video"].histories[user])
        assert not seen & {i for i, _ in served(few, user_id=user, k=10, exclude_seen=True)}


def test_item_values_are_scaled_by_the_whole_catalog_in_both_modes(checkpoint, demo_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "video"
    shutil.copytree(demo_dir / "video", folder)
    items = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
    for i, item in enumerate(items):
        if i % 3:
            item["value"] = float((i * 37) % 101)  # some items without a value
    (folder / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    valued = ServeConfig(value_weight=0.5, ann_min_items=0, max_k=240)
    exact = Recommender(checkpoint, [folder], tmp_path / "cache", valued)
    two = Recommender(
        checkpoint, [folder], tmp_path / "cache", dataclasses.replace(valued, ann_min_items=1, ann_candidates=30)
    )
    assert two.catalogs["video"].values is not None and two.catalogs["video"].ann is not None
    for user in USERS:
        every = dict(served(exact, user_id=user, k=240))  # each item's utility, scored with the whole catalog
        for item, score in served(two, user_id=user, k=10):  # from 30 candidates: the same utility per item
            assert score == pytest.approx(every[item], abs=1e-6)


def test_the_index_is_cached_per_checkpoint_and_catalog_and_rebuilt_when_damaged(checkpoint, demo_dir, tmp_path):
    settings = ServeConfig(ann_min_items=1, ann_candidates=240)
    cache = tmp_path / "cache"
    first = Recommender(checkpoint, [demo_dir / "video"], cache, settings)
    (index_file,) = cache.glob("*.hnsw")
    assert index_file.with_suffix(".safetensors").is_file()  # next to the item vectors it indexes
    stamp = index_file.stat().st_mtime_ns
    again = Recommender(checkpoint, [demo_dir / "video"], cache, settings)
    assert index_file.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert served(again, user_id=USERS[0], k=10) == served(first, user_id=USERS[0], k=10)
    index_file.write_bytes(b"damaged")
    rebuilt = Recommender(checkpoint, [demo_dir / "video"], cache, settings)
    assert served(rebuilt, user_id=USERS[0], k=10) == served(first, user_id=USERS[0], k=10)
    assert index_file.stat().st_size > 1000

    # an index of other vectors under this name (same shape) is not used: it is rebuilt from the table
    vectors = retrieval_vectors(first.catalogs["video"].table, first.catalogs["video"].bias, 1.0)
    other = hnsw_index(np.ascontiguousarray(vectors[::-1]), None)
    faiss.write_index(other, str(index_file))
    few = dataclasses.replace(settings, ann_candidates=30)  # (with every item a candidate, any index would do)
    checked = Recommender(checkpoint, [demo_dir / "video"], cache, few)
    for user in USERS:
        assert served(checked, user_id=user, k=10) == served(first, user_id=user, k=10)


def test_retrieval_settings_are_validated():
    with pytest.raises(ValueError, match="serve.ann-min-items"):
        ServeConfig(ann_min_items=-1)
    with pytest.raises(ValueError, match="serve.ann-candidates"):
        ServeConfig(ann_candidates=0)
