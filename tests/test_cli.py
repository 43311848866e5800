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


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("fed.roundz=3", "unknown config key 'fed.roundz'"),
        ("train.lr=inf", "config key 'train.lr' = inf: must be a finite number > 0"),
        ("train.weight-decay=nan", "config key 'train.weight-decay' = nan: must be a finite number >= 0"),
        ("train.aux-weight=inf", "config key 'train.aux-weight' = inf: must be a finite number >= 0"),
        ("train.seed=-5", "config key 'train.seed' = -5: must be >= 0"),
    ],
)
def test_bad_run_config_fails_before_anything_starts(tmp_path, capsys, settings, message):
    assert main(["simulate", "--runs-dir", str(tmp_path), "--run-config", settings]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_data_fails_before_a_run_folder_is_made(tmp_path, capsys):
    assert main(["simulate", "--runs-dir", str(tmp_path / "runs"), "--data", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_demo_data_command(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d")]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["news", "shop", "video"]


def test_data_commands_never_replace_or_touch_what_they_did_not_create(tmp_path, capsys):
    """convert / demo-data refuse a non-empty output (one line, exit 1, nothing changed) unless --force, and
    convert never writes into, over or around its source."""
    from tests.test_benchmark import write_public_fixtures

    data = write_public_fixtures(tmp_path / "data")
    src = data / "movies" / "ml-latest-small"
    before = {p: p.read_bytes() for p in src.iterdir()}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for out in (mine, src, src / "out", data):
        assert main(["convert", "movielens", str(src), str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "crossrec: error:" in err, err
        assert ("--force" in err) if out == mine else ("the source" in err), err
    assert main(["convert", "movielens", str(src), str(src), "--force"]) == 1  # --force never covers the source
    assert "the source" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(mine.iterdir()) == [mine / "notes.txt"]
    assert {p: p.read_bytes() for p in src.iterdir()} == before

    out = tmp_path / "movies"
    assert main(["convert", "movielens", str(src), str(out)]) == 0
    assert main(["convert", "movielens", str(src), str(out)]) == 1  # a second time: its own earlier output
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["convert", "movielens", str(src), str(out), "--force"]) == 0
    assert main(["convert", "movielens", str(src), str(mine), "--force"]) == 0  # the user asked for it
    assert (mine / "scenario.json").is_file() and not (mine / "notes.txt").exists()

    demo = tmp_path / "demo"
    assert main(["demo-data", str(demo)]) == 0
    (demo / "shop" / "items.jsonl").write_text("edited\n")
    assert main(["demo-data", str(demo)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert (demo / "shop" / "items.jsonl").read_text() == "edited\n"
    assert main(["demo-data", str(demo), "--force"]) == 0
    assert (demo / "shop" / "items.jsonl").read_text() != "edited\n"


def test_a_scenario_without_interactions_is_refused_and_nothing_is_written(tmp_path, capsys, demo_dir):
    import dataclasses

    from shared.data import load_scenario, write_scenario

    src = tmp_path / "ml"
    src.mkdir()
    (src / "movies.csv").write_text("movieId,title,genres\n1,Heat (1995),Drama\n")
    (src / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")  # header only
    assert main(["convert", "movielens", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ratings.csv: no valid ratings" in err, err
    assert not (tmp_path / "out").exists()
    shop = load_scenario(demo_dir / "shop")  # whatever a loader lets through, the writer checks too
    empty = dataclasses.replace(shop, users=[], sequences=[], labels={k: [] for k in shop.labels})
    with pytest.raises(ValueError, match="'shop' has 240 items and 0 interactions: nothing to write"):
        write_scenario(tmp_path / "empty", empty, [])
    assert not (tmp_path / "empty").exists()


def test_evaluate_and_check_data_bad_input_is_one_line(tmp_path, capsys, demo_dir):
    cases = [
        (["evaluate", "--checkpoint", str(tmp_path), "--data", str(demo_dir / "shop")], "neither a checkpoint folder"),
        (["check-data", str(tmp_path / "nowhere")], str(tmp_path / "nowhere")),
        (["check-data", str(demo_dir / "shop"), "--run-config", "model.objectives=clicks"], "declares objectives"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["check-data", str(demo_dir / "shop")]) == 0
    out = capsys.readouterr().out
    assert "scenario: shop" in out and "evaluated users: 360" in out and out.strip().endswith("ok")


def test_debug_shows_the_traceback_and_a_fault_is_one_line_without_it(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="'train.seed' = -5"):
        main(["--debug", "simulate", "--runs-dir", str(tmp_path), "--run-config", "train.seed=-5"])

    def broken(*args, **kwargs):
        raise KeyError("a fault of crossrec itself")

    monkeypatch.setattr("simulations.simulate.simulate", broken)
    assert main(["simulate", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "internal error: KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["--debug", "simulate", "--runs-dir", str(tmp_path)])
