"""Many clients per scenario: disjoint user shards, and a real Flower simulation of 6 SuperNodes."""

import json

import numpy as np
import pytest

from client.training import prepare, shard
from shared.data import load_scenario


@pytest.mark.parametrize("scenario", ["shop", "news"])
def test_shards_split_the_users_disjointly_and_cover_them(tiny_cfg, demo_dir, scenario):
    whole = prepare(load_scenario(demo_dir / scenario), tiny_cfg)
    parts = [shard(whole, k, 3) for k in range(3)]
    assert [p.scenario.name for p in parts] == [f"{scenario}-{k}" for k in range(3)]
    trainable = np.concatenate([p.trainable_users for p in parts])
    assert sorted(trainable) == sorted(whole.trainable_users) and len(set(trainable)) == len(trainable)
    assert sum(p.num_examples for p in parts) == whole.num_examples
    evaluated = np.concatenate([p.split.eval_users for p in parts])
    assert sorted(evaluated) == sorted(whole.split.eval_users)
    for p in parts:
        rows = np.searchsorted(whole.split.eval_users, p.split.eval_users)
        assert np.array_equal(p.split.test_target, whole.split.test_target[rows])  # targets stay aligned
    if whole.scenario.impressions is not None:
        tests = np.concatenate([p.split.test_impressions for p in parts])
        assert sorted(tests) == sorted(whole.split.test_impressions)
    assert shard(whole, 0, 1) is whole


@pytest.mark.integration
def test_scale_runs_six_supernodes_and_reports_round_times(tiny_cfg, tmp_path):
    from simulations.scale import scale
    from tests.test_simulation import overrides

    rows = scale(tmp_path / "scale", [2], overrides(tiny_cfg, **{"fed.rounds": 2}))
    assert [r["clients"] for r in rows] == [6] and rows[0]["rounds"] == 2 and rows[0]["dropped_replies"] == 0
    meta = json.loads((tmp_path / "scale/shards-2/checkpoints/round-0002/meta.json").read_text())
    assert {d["scenario"] for d in meta["aggregation"]} == {
        f"{s}-{k}" for s in ("shop", "video", "news") for k in (0, 1)
    }
    assert json.loads((tmp_path / "scale/scale.json").read_text()) == rows
    assert not (tmp_path / "scale/cache").exists()
