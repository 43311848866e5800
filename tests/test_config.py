import tomllib
from pathlib import Path

import pytest

from shared.config import Config


def test_pyproject_defaults_equal_schema_defaults():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    table = pyproject["tool"]["flwr"]["app"]["config"]
    flat = {f"{group}.{key}": value for group, keys in table.items() for key, value in keys.items()}
    assert flat == Config().to_flat()


def test_round_trip_through_flat_config():
    flat = Config().to_flat() | {"train.lr": 0.01, "fed.rounds": 3, "data.scenarios": "a,b"}
    cfg = Config.from_run_config(flat)
    assert cfg.train.lr == 0.01 and cfg.fed.rounds == 3 and cfg.data.scenario_names == ("a", "b")
    assert Config.from_run_config(cfg.to_flat()) == cfg


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.lrr", 0.1, "unknown config key 'train.lrr'"),
        ("train.lr", "fast", "'train.lr' = 'fast': must be of type float"),
        ("train.lr", -1.0, "'train.lr' = -1.0: must be a finite number > 0"),
        ("train.memory-lr", 0.0, "'train.memory-lr' = 0.0: must be a finite number > 0"),
        ("train.fresh-items", -1, "'train.fresh-items' = -1: must be >= 0"),
        ("model.seq-dim", 63, "'model.seq-dim' = 63: must be a multiple of model.seq-heads (2)"),
        ("model.seq-dropout", 1.0, "'model.seq-dropout' = 1.0: must be in [0, 1)"),
        ("model.scale", 0.0, "'model.scale' = 0.0: must be a finite number > 0"),
        ("train.negatives", -1, "'train.negatives' = -1: must be >= 0"),
        ("fed.rounds", 0, "'fed.rounds' = 0: must be >= 1"),
        ("fed.weighting", "median", "'fed.weighting' = 'median'"),
        ("model.objectives", "a,a", "'model.objectives'"),
        ("data.lenient", 1, "'data.lenient' = 1: must be of type bool"),
        ("train.lr", float("inf"), "'train.lr' = inf: must be a finite number > 0"),
        ("train.weight-decay", float("nan"), "'train.weight-decay' = nan: must be a finite number >= 0"),
        ("train.aux-weight", float("inf"), "'train.aux-weight' = inf: must be a finite number >= 0"),
        ("train.seed", -5, "'train.seed' = -5: must be >= 0"),
        ("serve.value-weight", float("nan"), "'serve.value-weight' = nan: must be finite"),
        ("fed.timeout", float("inf"), "'fed.timeout' = inf: must be > 0"),
        ("fed.max-share", 0.0, "'fed.max-share' = 0.0: must be in (0, 1]"),
        ("fed.max-share", float("nan"), "'fed.max-share' = nan: must be in (0, 1]"),
        ("fed.clip", 0.5, "'fed.clip' = 0.5: must be >= 1 (a multiple of the median) or 0 (off)"),
        ("fed.outlier", float("inf"), "'fed.outlier' = inf: must be a finite number >= 0 (0 = off)"),
        ("fed.robust", "krum", "'fed.robust' = 'krum': must be one of 'mean', 'trimmed-mean', 'median'"),
        ("fed.aggregation", "fedsa", "'fed.aggregation' = 'fedsa': must be one of 'fedavg', 'ffa'"),
        ("fed.trim", 0.5, "'fed.trim' = 0.5: must be in [0, 0.5)"),
    ],
)
def test_bad_keys_and_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Config.from_run_config({key: value})


def test_int_accepted_for_float():
    assert Config.from_run_config({"train.lr": 1}).train.lr == 1.0
