"""The SASRec reference (simulations/sasrec.py) on tiny data: causality, learning, refusal, early stopping."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from client.evaluation import eval_sequences, load_per_user, per_user_file, popularity_metrics
from client.training import prepare
from shared.data import load_scenario
from simulations.sasrec import SASRec, SASRecSettings, sasrec_rows


@pytest.fixture()
def shop(demo_dir, tiny_cfg):
    return prepare(load_scenario(demo_dir / "shop"), tiny_cfg)


def test_output_at_t_depends_on_items_up_to_t_only():
    torch.manual_seed(0)
    model = SASRec(30, SASRecSettings(max_length=8, dropout=0.0)).eval()
    seq = torch.tensor([[-1, -1, 3, 7, 1, 9, 4, 2], [5, 6, 8, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        before = model(seq)
        for t in range(seq.shape[1] - 1):
            changed = seq.clone()
            changed[:, t + 1 :] = (seq[:, t + 1 :] + torch.randint(1, 30, seq[:, t + 1 :].shape)) % 30  # all differ
            after = model(changed)
            torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1])
            assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])  # later positions do read them
        # the left padding is invisible: the same items with fewer padding columns give the same last state
        torch.testing.assert_close(model(seq[:1, 2:])[:, -1], before[:1, -1])


def test_training_beats_popularity_on_validation(shop, tiny_cfg, tmp_path):
    popular = popularity_metrics(shop)["valid.ndcg@10"]
    seen = []
    settings = SASRecSettings(max_length=8, max_epochs=30, eval_every=10, patience=3, lr=3e-3, dropout=0.2)
    rows = sasrec_rows(tiny_cfg, shop, on_row=seen.append, folder=tmp_path, settings=settings)
    assert [r["round"] for r in rows] == [10, 20, 30] and seen == rows
    best = max(r["valid"]["ndcg@10"] for r in rows)
    assert best > 2 * popular, (best, popular)  # popularity: 0.096 here; this SASRec 0.25 (untrained: 0.01)
    assert rows[0]["reference"] == "sasrec" and rows[0]["scenario"] == "shop"
    ranking = {"hr@10", "ndcg@10", "mrr"}
    masked = {f"masked-{m}" for m in ranking}
    assert set(rows[0]["valid"]) == set(rows[0]["test"]) == ranking | masked | {"ild@10", "coverage@10"}
    assert any(r["valid"]["masked-ndcg@10"] != r["valid"]["ndcg@10"] for r in rows)
    assert rows[-1]["train"]["epochs"] == 30 and rows[-1]["train"]["loss"] < 5.0
    json.dumps(rows)  # rows are plain JSON
    values = load_per_user(per_user_file(tmp_path, "shop", 30))  # per-user values for paired intervals
    assert len(values["test.ndcg@10"]) == len(shop.split.eval_users)
    assert np.isclose(values["valid.ndcg@10"].mean(), rows[-1]["valid"]["ndcg@10"])
    # masking a user's own items moves a target that is not one of them up or leaves it, and a repeat down
    sequences, targets = eval_sequences(shop, "valid")
    repeat = np.array([t in seq for seq, t in zip(sequences, targets, strict=True)])
    assert repeat.any() and not repeat.all()
    assert (values["valid.masked-ndcg@10"][~repeat] >= values["valid.ndcg@10"][~repeat]).all()
    assert (values["valid.masked-ndcg@10"][repeat] == 0).all()


def test_untrained_model_is_not_better_than_popularity(shop, tiny_cfg):
    """What the test above checks can fail: SASRec at (nearly) no training is far below popularity."""
    rows = sasrec_rows(tiny_cfg, shop, settings=SASRecSettings(max_length=8, max_epochs=1, lr=1e-6))
    assert rows[0]["valid"]["ndcg@10"] < popularity_metrics(shop)["valid.ndcg@10"]


def test_impression_scenario_is_refused(demo_dir, tiny_cfg, tmp_path):
    folder = tmp_path / "news"
    shutil.copytree(demo_dir / "news", folder)
    (folder / "impressions.jsonl").write_text(
        json.dumps(
            {
                "impression_id": 2,
                "user_id": "news-user-0000",
                "timestamp": 2_000_000_000,
                "candidates": ["news-0001", "news-0002"],
                "clicks": [1, 0],
            }
        )
        + "\n"
    )
    data = prepare(load_scenario(folder), tiny_cfg)
    assert data.scenario.impressions is not None
    with pytest.raises(ValueError, match="impression scenario: SASRec is for sequential"):
        sasrec_rows(tiny_cfg, data)


def test_early_stopping_stops_when_validation_stops_improving(shop, tiny_cfg):
    settings = SASRecSettings(max_length=8, max_epochs=200, patience=2, lr=1e-2, dropout=0.0)
    rows = sasrec_rows(tiny_cfg, shop, settings=settings)
    ndcg = [r["valid"]["ndcg@10"] for r in rows]
    assert len(rows) < settings.max_epochs  # it overfits quickly at this learning rate
    # it stopped exactly when the rule says: the last `patience` evaluations are no new best, and before
    # them there was never such a run
    best_before = max(ndcg[: -settings.patience])
    assert all(x <= best_before for x in ndcg[-settings.patience :])
    since = 0
    for i in range(1, len(ndcg) - 1):
        since = 0 if ndcg[i] > max(ndcg[:i]) else since + 1
        assert since < settings.patience, ndcg


def test_wall_budget_stops_training(shop, tiny_cfg):
    rows = sasrec_rows(tiny_cfg, shop, settings=SASRecSettings(max_length=8, eval_every=50, max_seconds=1e-3))
    assert [r["round"] for r in rows] == [1]  # evaluated at once, though not an evaluation epoch


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_length", 0), ("dropout", 1.0), ("lr", 0.0), ("patience", 0), ("heads", 3), ("max_seconds", float("nan"))],
)
def test_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=f"SASRecSettings.{field if field != 'heads' else 'hidden'}"):
        SASRecSettings(**{field: value})


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SASRecSettings().lr = 1.0  # type: ignore[misc]
