"""A real Flower simulation (SuperLink + 3 simulated SuperNodes) on a tiny config-built transformer."""

import json

import psutil
import pytest
from safetensors.numpy import load_file

from server.launch import toml_value
from shared.config import Config
from simulations.simulate import simulate

pytestmark = pytest.mark.integration


def overrides(cfg: Config, **extra) -> str:
    changed = {
        k: v for k, v in cfg.to_flat().items() if Config().to_flat()[k] != v and not k.startswith(("data.", "run."))
    }
    return " ".join(f"{k}={toml_value(v)}" for k, v in (changed | extra).items())


def flower_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + str((p.info["environ"] or {}).get("FLWR_HOME", ""))
        except psutil.Error:
            continue
        if marker in text:
            found.append(p)
    return found


@pytest.fixture(scope="module")
def first(tiny_cfg, tmp_path_factory):
    """A finished two-round simulation on the demo data: the main job's run folder (tests only read it)."""
    runs = tmp_path_factory.mktemp("runs")
    run = simulate(overrides(tiny_cfg, **{"fed.rounds": 2}), runs_dir=str(runs))
    assert (runs / "latest").resolve() == run
    return run


def test_simulation_end_to_end_then_resume_from_round_1(first, tiny_cfg, tmp_path):
    # outputs of the main job
    summary = json.loads((first / "summary.json").read_text())
    assert set(summary["scenarios"]) == {"shop", "video", "news"}
    for refs in summary["scenarios"].values():
        assert set(refs) == {"popularity", "local", "federated"}
        for metrics in refs.values():
            assert set(metrics) == {"hr@10", "ndcg@10", "mrr", "ild@10", "coverage@10"}
            assert all(0 <= v <= 1 for v in metrics.values())
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    fed = [(r["round"], r["scenario"]) for r in rows if r["reference"] == "federated"]
    assert sorted(fed) == sorted((r, s) for r in (1, 2) for s in ("shop", "video", "news"))
    assert len([r for r in rows if r["reference"] == "local"]) == 6
    for name in (
        "report.md",
        "plots/ndcg_at_10.png",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoints/round-0001/weights.safetensors",
        "checkpoints/round-0002/meta.json",
    ):
        assert (first / name).is_file(), name
    meta = json.loads((first / "checkpoints/round-0002/meta.json").read_text())
    assert meta["round"] == 2 and set(meta["metrics"]) == {"shop", "video", "news"}
    weighed = meta["aggregation"]  # the server's decision for every reply
    assert {d["scenario"] for d in weighed} == {"shop", "video", "news"}
    assert sum(d["share"] for d in weighed) == pytest.approx(1.0) and max(d["share"] for d in weighed) <= 0.5
    assert all(0 < d["clipped_to"] <= d["update_norm"] for d in weighed)
    assert not flower_processes(str(first)), "a Flower process outlived the run"

    # `crossrec evaluate` on the run folder, and on its adapter export alone, gives the run's own figures
    from simulations.cli import main

    for checkpoint in (first, first / "adapter"):
        out = tmp_path / f"evaluate-{checkpoint.name}.json"
        folders = [str(first / "data" / s) for s in ("shop", "video", "news")]
        args = ["evaluate", "--checkpoint", str(checkpoint), "--references", "popularity", "--json", str(out)]
        assert main([*args, *(x for f in folders for x in ("--data", f))]) == 0
        judged = json.loads(out.read_text())
        assert judged["round"] == summary["selected_round"]["shop"]["federated"]
        for name, refs in summary["scenarios"].items():
            assert judged["private_memory"][name] is not None
            for ref, mine in (("federated", "checkpoint"), ("popularity", "popularity")):
                assert judged["scenarios"][name][mine] == pytest.approx(refs[ref], abs=1e-6), (name, ref)
    assert main(["check-data", str(first / "data" / "news")]) == 0

    # resume from the round-1 checkpoint: only round 2 runs, and it reproduces the uninterrupted round 2
    resumed = simulate(
        overrides(tiny_cfg, **{"fed.rounds": 2, "run.resume": str(first / "checkpoints/round-0001")}),
        runs_dir=str(tmp_path / "runs"),
    )
    rows2 = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rows2 if r["reference"] == "federated"} == {2}
    assert not (resumed / "checkpoints/round-0001").exists()
    a = load_file(str(first / "checkpoints/round-0002/weights.safetensors"))
    b = load_file(str(resumed / "checkpoints/round-0002/weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]).max() <= 1e-5, key
    assert not flower_processes(str(resumed))


@pytest.mark.parametrize("kind", ["simulate", "transfer"])
def test_a_stopped_job_leaves_no_process_behind(tiny_cfg, tmp_path, kind):
    """SIGTERM to ``crossrec simulate`` (or the transfer measurement) while its Flower simulation runs:
    every process below it is gone."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    if kind == "simulate":
        crossrec = Path(sys.executable).parent / "crossrec"
        command = [str(crossrec), "simulate", "--runs-dir", str(tmp_path), "--run-config"]
        settings = overrides(tiny_cfg, **{"fed.rounds": 50})
    else:
        from tests.test_benchmark import tiny_overrides, write_public_fixtures

        data = write_public_fixtures(tmp_path / "data")
        command = [sys.executable, "-m", "simulations.transfer", "--data", str(data), "--scenarios", "movies,ecommerce"]
        command += ["--held-out", "movies", "--runs-dir", str(tmp_path / "runs"), "--run-config"]
        settings = tiny_overrides(tiny_cfg).replace("fed.rounds=2", "fed.rounds=50")
    job = subprocess.Popen([*command, settings], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, psutil.Process] = {}
    names: dict[int, str] = {}
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # wait until the simulation runtime has started under the SuperLink
            for p in psutil.Process(job.pid).children(recursive=True):
                seen.setdefault(p.pid, p)
                with contextlib.suppress(psutil.Error):
                    names[p.pid] = " ".join(p.cmdline())
            if all(any(what in n for n in names.values()) for what in ("flower-superlink", "flwr-simulation")):
                break
            assert job.poll() is None, "the job ended before its simulation started"
            time.sleep(0.5)
        else:
            pytest.fail(f"the simulation did not start within 120 s: {names}")
        time.sleep(2)
        seen.update({p.pid: p for p in psutil.Process(job.pid).children(recursive=True)})
        os.kill(job.pid, signal.SIGTERM)
        assert job.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
        assert not alive, f"outlived the stopped job: {[names.get(p.pid) for p in alive]}"
    finally:
        if job.poll() is None:
            job.kill()
        for p in seen.values():
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_a_new_scenario_is_checked_judged_and_joins_a_resumed_federation(first, tiny_cfg, tmp_path, capsys):
    """An organisation brings its own canonical folder: `check-data` accepts it, `evaluate` judges the
    current global checkpoint on it from text alone (it has no private memory yet), and it joins the
    federation when the simulation resumes from the latest checkpoint with its folder added."""
    import shutil

    from simulations.cli import main

    data = tmp_path / "data"
    shutil.copytree(first / "data", data)
    shutil.copytree(data / "shop", data / "books")  # the newcomer's own log (the shop generator's, renamed)
    spec = json.loads((data / "books/scenario.json").read_text())
    (data / "books/scenario.json").write_text(json.dumps(spec | {"name": "books"}))

    assert main(["check-data", str(data / "books")]) == 0
    out = tmp_path / "books.json"
    assert main(["evaluate", "--checkpoint", str(first), "--data", str(data / "books"), "--json", str(out)]) == 0
    judged = json.loads(out.read_text())
    chosen = json.loads((first / "summary.json").read_text())["selected_round"]["shop"]["federated"]
    assert judged["round"] == chosen and judged["private_memory"] == {"books": None}
    assert 0 <= judged["scenarios"]["books"]["checkpoint"]["ndcg@10"] <= 1

    settings = {
        "fed.rounds": 3,
        "fed.min-clients": 4,
        "data.scenarios": "shop,video,news,books",
        "run.resume": str(first / "checkpoints/round-0002"),
    }
    joined = simulate(overrides(tiny_cfg, **settings), data=str(data), runs_dir=str(tmp_path / "runs"))
    rows = [json.loads(line) for line in (joined / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["scenario"]) for r in rows if r["reference"] == "federated"} == {
        (3, s) for s in ("shop", "video", "news", "books")
    }
    meta = json.loads((joined / "checkpoints/round-0003/meta.json").read_text())
    assert {d["scenario"] for d in meta["aggregation"]} == {"shop", "video", "news", "books"}
    assert (joined / "clients/books/private.safetensors").is_file()  # the newcomer now has its own memory
    assert not flower_processes(str(joined))
