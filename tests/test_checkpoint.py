import dataclasses
import json

import numpy as np
import pytest

from shared.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from shared.config import Config


def test_checkpoint_round_trips_exactly(tmp_path):
    cfg = Config()
    arrays = {"a": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.float32)}
    folder = save_checkpoint(tmp_path, 3, arrays, cfg, {"metrics": {"shop": {"valid": {"ndcg@10": 0.5}}}})
    assert folder.name == "round-0003" and latest_checkpoint(tmp_path) == folder
    done, loaded, meta = load_checkpoint(folder, cfg)
    assert done == 3 and loaded.keys() == arrays.keys()
    assert all(np.array_equal(loaded[k], arrays[k]) and loaded[k].dtype == arrays[k].dtype for k in arrays)
    assert meta["config"] == cfg.to_flat() and meta["metrics"]["shop"]["valid"]["ndcg@10"] == 0.5
    assert json.loads((folder / "meta.json").read_text())["round"] == 3
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-0003"]  # no temp folder left


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    cfg = Config()
    folder = save_checkpoint(tmp_path, 1, {"a": np.zeros(2, np.float32)}, cfg, {})
    other = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=4))
    with pytest.raises(ValueError, match="different model"):
        load_checkpoint(folder, other)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path, cfg)


def test_failed_write_leaves_the_previous_checkpoint(tmp_path):
    cfg = Config()
    save_checkpoint(tmp_path, 1, {"a": np.ones(2, np.float32)}, cfg, {})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, {"a": np.zeros(2, np.float32)}, cfg, {"bad": object()})  # not JSON
    _, loaded, _ = load_checkpoint(tmp_path / "checkpoints" / "round-0001", cfg)
    assert np.array_equal(loaded["a"], np.ones(2, np.float32))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-0001"]
