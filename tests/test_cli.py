import pytest

from simulations.cli import main
from simulations.simulate import parse_overrides


def test_parse_overrides_types():
    assert parse_overrides("fed.rounds=3 train.lr=0.5 data.lenient=true model.objectives='a,b' run.dir=x/y") == {
        "fed.rounds": 3,
        "train.lr": 0.5,
        "data.lenient": True,
        "model.objectives": "a,b",
        "run.dir": "x/y",
    }
    with pytest.raises(ValueError, match="not key=value"):
        parse_overrides("fed.rounds")


def test_bad_run_config_fails_before_anything_starts(tmp_path, capsys):
    assert main(["simulate", "--runs-dir", str(tmp_path), "--run-config", "fed.roundz=3"]) == 1
    assert "unknown config key 'fed.roundz'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_demo_data_command(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d")]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["news", "shop", "video"]
