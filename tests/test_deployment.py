"""The deployed federation on real processes: a SuperLink (TLS, SuperNode authentication) and two client
daemons on 127.0.0.1 (a third organisation's admitted while it runs), driven through the ``crossrec``
command, with the tiny config-built BERT.

One federation serves the whole module (starting it costs a torch import per daemon); every process a test
starts is registered with it and stopped, by PID, at the end whatever happens.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from cryptography import x509
from safetensors.numpy import load_file

from server.certs import make_certificates
from server.launch import die_with_parent, executable, flower_env, free_port, stop_tree, toml_value
from shared.config import Config
from shared.model import RecModel
from shared.records import trainable_state
from simulations.cli import main

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("shop", "news")  # every round's cost grows with the daemons: two, and the newcomer, show it all
NEWCOMER = "books"  # a fourth organisation, admitted while the federation runs (its log: the shop's, renamed)
RUN_TIMEOUT = 900.0  # seconds a run may take on a loaded 2-core machine before the test fails
TOLERANCE = 1e-5  # max |difference| between resumed and uninterrupted final weights (fp32, sums in reply order)


def run_overrides(cfg: Config, **extra: bool | int | float | str) -> dict[str, bool | int | float | str]:
    """The tiny config's non-default keys plus ``extra`` (a run config for ``crossrec submit``)."""
    defaults = Config().to_flat()
    return {k: v for k, v in cfg.to_flat().items() if defaults[k] != v} | extra


def config_text(overrides: dict[str, bool | int | float | str]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())


def wait_for(condition, timeout: float, what: str, poll: float = 0.5, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail()}")


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """A crash: SIGKILL a process and every process below it, no chance to clean up."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)
    proc.wait(timeout=10)


class Federation:
    """Certificates, a SuperLink and client daemons, all started through the ``crossrec`` command."""

    def __init__(self, root: Path, data: Path) -> None:
        self.root, self.data = root, data
        self.certs = make_certificates(root / "certs", ["127.0.0.1"], [*SCENARIOS, NEWCOMER])
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.superlink: subprocess.Popen[bytes] | None = None
        self.client_ports = {name: free_port() for name in (*SCENARIOS, NEWCOMER)}
        self.members = list(SCENARIOS)  # the scenarios whose daemons the SuperLink admitted
        shutil.copytree(data / "shop", root / NEWCOMER)
        spec = json.loads((root / NEWCOMER / "scenario.json").read_text())
        (root / NEWCOMER / "scenario.json").write_text(json.dumps(spec | {"name": NEWCOMER}))

    def spawn(self, log: Path, *args: str) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "simulations.cli", *args],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        log = self.root / "superlink.out"
        start = log.stat().st_size if log.exists() else 0
        keys = [a for name in SCENARIOS for a in ("--register", str(self.certs / "supernodes" / f"{name}.pub"))]
        self.superlink = self.spawn(
            log,
            *("superlink", "--state-dir", str(self.root / "link"), "--host", "127.0.0.1", "--port", str(self.port)),
            *("--ca", str(self.certs / "ca.crt"), "--cert", str(self.certs / "server.pem")),
            *("--key", str(self.certs / "server.key"), *keys),
        )
        proc = self.superlink
        wait_for(
            lambda: proc.poll() is not None or "ready" in log.read_text()[start:], 120, "the SuperLink to be ready"
        )
        assert proc.poll() is None, log.read_text()[start:]

    def start_client(self, name: str) -> subprocess.Popen[bytes]:
        data = self.data / name if name in SCENARIOS else self.root / name
        proc = self.spawn(
            self.client_log(name),
            *("client", "--superlink", self.address, "--data", str(data)),
            *("--ca", str(self.certs / "ca.crt"), "--key", str(self.certs / "supernodes" / name)),
            *("--state-dir", str(self.root / "clients" / name), "--port", str(self.client_ports[name])),
        )
        self.clients[name] = proc
        return proc

    def client_log(self, name: str) -> Path:
        return self.root / f"client-{name}.out"

    def node_ids(self, name: str) -> list[int]:
        """Node ids a daemon's log reports, one per (re)start that the SuperLink accepted."""
        log = self.client_log(name)
        return [int(i) for i in re.findall(r"SuperNode ID: (\d+)", log.read_text())] if log.exists() else []

    def wait_connected(self, name: str, starts: int) -> int:
        proc = self.clients[name]
        wait_for(lambda: proc.poll() is not None or len(self.node_ids(name)) >= starts, 180, f"client daemon {name}")
        assert proc.poll() is None, self.client_log(name).read_text()[-3000:]
        return self.node_ids(name)[-1]

    def node_status(self) -> dict[int, str]:
        """``flwr supernode list`` as node id -> status, from the SuperLink host."""
        done = subprocess.run(
            [executable("flwr"), "supernode", "list", "--format", "json"],
            env=flower_env(self.root / "link" / "flwr-home"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        return {int(n["node-id"]): n["status"] for n in json.loads(done.stdout)["nodes"]}

    def submit(self, log: Path, overrides: dict[str, bool | int | float | str]) -> subprocess.Popen[bytes]:
        return self.spawn(
            log,
            "submit",
            "--superlink",
            self.address,
            "--ca",
            str(self.certs / "ca.crt"),
            "--run-config",
            config_text(overrides),
        )

    def diagnostics(self, log: Path) -> str:
        """What a failed run leaves to read: the end of its submit log, the SuperLink's errors and warnings,
        and the end of every daemon's log."""
        parts = [f"--- {log.name}\n{log.read_text()[-3000:] if log.exists() else '(none)'}"]
        link = self.root / "link" / "superlink.log"
        if link.exists():
            lines = [line for line in link.read_text().splitlines() if "ERROR" in line or "WARN" in line]
            parts.append("--- superlink.log, errors and warnings\n" + "\n".join(lines[-40:]))
        for name in self.clients:
            parts.append(f"--- client-{name}.out\n{self.client_log(name).read_text()[-1500:]}")
        return "\n".join(parts)

    def stop(self) -> list[int]:
        """Stop every process started, with its descendants; return the PIDs still running afterwards."""
        tree: list[psutil.Process] = []
        for proc in self.procs:
            try:
                tree += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for proc in reversed(self.procs):
            stop_tree(proc)
        survivors = []
        for p in tree:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    survivors.append(p.pid)
            except psutil.NoSuchProcess:
                continue
        return survivors


def finished(proc: subprocess.Popen[bytes], federation: Federation, log: Path) -> int:
    """The run's exit code; a run still going after RUN_TIMEOUT fails with the federation's diagnostics."""
    try:
        return proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"run did not finish in {RUN_TIMEOUT:.0f}s\n{federation.diagnostics(log)}") from exc


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("deployment"), demo_dir)
    try:
        fed.start_superlink()
        for name in SCENARIOS:
            fed.start_client(name)
        for name in SCENARIOS:
            fed.wait_connected(name, 1)
        yield fed
    finally:
        survivors = fed.stop()
        assert not survivors, f"processes outlived the federation: {survivors}"


def everyone(federation: Federation) -> dict[str, bool | int | float | str]:
    """Rounds that wait for every admitted daemon (after a SuperLink restart they reconnect one by one)."""
    return {"fed.min-clients": len(federation.members)}


def full_run(federation: Federation, cfg: Config) -> Path:
    """Two uninterrupted rounds with every admitted daemon, run once per module (the resume test's reference)."""
    run_dir = federation.root / "run-full"
    if not (run_dir / "checkpoints/round-0002").is_dir():
        log = federation.root / "submit-full.out"
        extra: dict[str, bool | int | float | str] = {"fed.rounds": 2, "run.dir": str(run_dir)} | everyone(federation)
        proc = federation.submit(log, run_overrides(cfg, **extra))
        assert finished(proc, federation, log) == 0, federation.diagnostics(log)
        assert "completed" in log.read_text()
    return run_dir


# ---------------------------------------------------------------------------------------------- no processes


def test_certificates_chain_and_keys(tmp_path):
    out = make_certificates(tmp_path / "c", ["link.example.org", "10.0.0.5"], ["shop"])
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert (out / "supernodes/shop.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (out / "supernodes/shop").stat().st_mode & 0o077 == 0  # private keys: owner only
    with pytest.raises(FileExistsError, match="already holds ca.crt"):
        make_certificates(tmp_path / "c", ["x"], [])
    with pytest.raises(ValueError, match="--supernode '../x'"):
        make_certificates(tmp_path / "d", ["x"], ["../x"])


def test_client_daemon_refuses_bad_start(tmp_path, demo_dir, capsys):
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"], ["shop"])
    base = ["client", "--superlink", "127.0.0.1:1", "--ca", str(certs / "ca.crt"), "--state-dir", str(tmp_path / "s")]
    key = ["--key", str(certs / "supernodes/shop")]

    assert main([*base, "--data", str(demo_dir / "shop"), "--key", str(tmp_path / "missing")]) == 1
    assert f"SuperNode authentication key {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert main([*base, "--data", str(demo_dir / "shop"), "--key", str(certs / "ca.crt")]) == 1
    assert "is not an unencrypted OpenSSH private key" in capsys.readouterr().err
    no_ca = ["--ca", str(tmp_path / "nope.crt")]
    assert main([*base, *no_ca, "--data", str(demo_dir / "shop"), *key]) == 1
    assert f"CA certificate {tmp_path / 'nope.crt'} does not exist" in capsys.readouterr().err

    bad = tmp_path / "bad-shop"
    shutil.copytree(demo_dir / "shop", bad)
    lines = (bad / "items.jsonl").read_text().splitlines()
    lines[6] = json.dumps({"item_id": "x7"})
    (bad / "items.jsonl").write_text("\n".join(lines) + "\n")
    assert main([*base, "--data", str(bad), *key]) == 1
    assert "items.jsonl:7: field 'text' is missing" in capsys.readouterr().err
    assert main([*base, "--data", str(demo_dir / "shop"), *key, "--scenario", "news"]) == 1
    assert "--scenario 'news', but" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing started, nothing written


# ------------------------------------------------------------------------------------------- real processes


@pytest.mark.deployment
def test_supernode_with_unknown_key_is_refused(federation):
    proc = federation.start_client(NEWCOMER)  # its key is not registered (yet)
    code = proc.wait(timeout=180)
    assert code != 0
    assert "Failed to activate SuperNode" in federation.client_log(NEWCOMER).read_text()
    assert "No SuperNode found with the given public key" in (federation.root / "link/superlink.log").read_text()
    assert len(federation.node_status()) == len(federation.members)  # the stranger never became a node


@pytest.mark.deployment
def test_new_supernode_is_admitted_while_the_federation_runs(federation, capsys):
    """`crossrec register` admits a fourth organisation's key to the running SuperLink; its daemon then
    connects, and nothing else restarts (the next runs train it with the others)."""
    running = {p.pid for p in [federation.superlink, *federation.clients.values()] if p and p.poll() is None}
    link, key = federation.root / "link", federation.certs / "supernodes" / f"{NEWCOMER}.pub"

    assert main(["register", "--state-dir", str(federation.root / "elsewhere"), str(key)]) == 1
    assert "no SuperLink state here" in capsys.readouterr().err
    assert main(["register", "--state-dir", str(link), str(federation.root / "nope.pub")]) == 1
    assert "no such public key file" in capsys.readouterr().err
    assert main(["register", "--state-dir", str(link), str(key)]) == 0
    assert f"registered {key}" in capsys.readouterr().out

    federation.start_client(NEWCOMER)
    node = federation.wait_connected(NEWCOMER, 1)
    wait_for(lambda: federation.node_status().get(node) == "online", 120, f"{NEWCOMER} to be online", poll=2)
    federation.members.append(NEWCOMER)
    assert len(federation.node_status()) == len(federation.members)
    assert main(["register", "--state-dir", str(link), str(key)]) == 0  # again: fine, and no second node
    assert f"already registered {key}" in capsys.readouterr().out
    assert len(federation.node_status()) == len(federation.members)
    assert all(psutil.pid_exists(pid) for pid in running)  # the SuperLink and the other daemons kept running


@pytest.mark.deployment
def test_client_killed_mid_round_then_rejoins(federation, tiny_cfg):
    """min-clients = members - 1: the round completes with the others after news dies; news restarts and
    rejoins."""
    news_id = federation.node_ids("news")[-1]
    run_dir = federation.root / "run-killed"
    log = federation.root / "submit-killed.out"
    overrides = run_overrides(
        tiny_cfg, **{"fed.rounds": 1, "fed.min-clients": len(federation.members) - 1, "run.dir": str(run_dir)}
    )
    news = federation.clients["news"]

    def clientapps() -> set[int]:
        found = set()
        for p in psutil.Process(news.pid).children(recursive=True):
            try:
                if "flwr-clientapp" in p.name():
                    found.add(p.pid)
            except psutil.NoSuchProcess:
                continue
        return found

    before = clientapps()
    submit = federation.submit(log, overrides)
    wait_for(lambda: clientapps() - before, 300, "news to start training", poll=0.2)
    assert not (run_dir / "checkpoints").exists()  # mid-round: nothing aggregated yet
    kill_tree(news)

    assert finished(submit, federation, log) == 0, federation.diagnostics(log)
    meta = json.loads((run_dir / "checkpoints/round-0001/meta.json").read_text())
    assert set(meta["metrics"]) == set(federation.members) - {"news"}
    assert any(f"node {news_id}" in d and "Node Unavailable" in d for d in meta["dropped"]), meta["dropped"]
    weights = load_file(str(run_dir / "checkpoints/round-0001/weights.safetensors"))
    initial = trainable_state(RecModel(tiny_cfg))
    assert {k: (v.shape, v.dtype) for k, v in weights.items()} == {k: (v.shape, v.dtype) for k, v in initial.items()}
    assert all(np.isfinite(v).all() for v in weights.values())
    assert any(not np.array_equal(weights[k], initial[k]) for k in initial)  # the two replies were averaged in

    federation.start_client("news")
    assert federation.wait_connected("news", 2) == news_id  # same key, same node
    wait_for(lambda: federation.node_status().get(news_id) == "online", 120, "news to be online again", poll=2)


@pytest.mark.deployment
def test_two_rounds_over_tls_with_authenticated_daemons(federation, tiny_cfg):
    """Every admitted daemon (news restarted by a test before, books admitted, if they ran) takes part in both
    rounds."""
    run_dir = full_run(federation, tiny_cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    members = federation.members
    assert sorted((r["round"], r["scenario"]) for r in rows) == sorted((r, s) for r in (1, 2) for s in members)
    for row in rows:
        assert row["train"]["num-examples"] > 0
        for split in ("valid", "test"):
            assert set(row[split]) >= {"hr@10", "ndcg@10", "mrr"} and all(0 <= v <= 1 for v in row[split].values())
    meta = json.loads((run_dir / "checkpoints/round-0002/meta.json").read_text())
    assert meta["round"] == 2 and set(meta["metrics"]) == set(members) and meta["dropped"] == []
    assert (run_dir / "checkpoints/round-0001/weights.safetensors").is_file()
    assert (run_dir / "adapter/adapter_model.safetensors").is_file()
    assert len(federation.node_status()) == len(members)


@pytest.mark.deployment
def test_server_killed_after_round_1_then_resumed(federation, tiny_cfg):
    """Kill the SuperLink (and its ServerApp) after round 1; restart it; resume: same weights as uninterrupted."""
    run_dir, resumed_dir = federation.root / "run-cut", federation.root / "run-resumed"
    log = federation.root / "submit-cut.out"
    submit = federation.submit(
        log, run_overrides(tiny_cfg, **{"fed.rounds": 2, "run.dir": str(run_dir)} | everyone(federation))
    )
    wait_for(
        lambda: (run_dir / "checkpoints/round-0001").is_dir() or submit.poll() is not None,
        RUN_TIMEOUT,
        "round 1",
        detail=lambda: federation.diagnostics(log),
    )
    assert federation.superlink is not None
    kill_tree(federation.superlink)
    assert finished(submit, federation, log) == 1, federation.diagnostics(log)
    assert "lost the SuperLink" in log.read_text()
    assert not (run_dir / "checkpoints/round-0002").exists()

    federation.start_superlink()  # same state folder and port: the daemons reconnect by themselves
    log = federation.root / "submit-resumed.out"
    resume = str(run_dir / "checkpoints/round-0001")
    submit = federation.submit(
        log,
        run_overrides(
            tiny_cfg, **{"fed.rounds": 2, "run.resume": resume, "run.dir": str(resumed_dir)} | everyone(federation)
        ),
    )
    assert finished(submit, federation, log) == 0, federation.diagnostics(log)
    assert not (resumed_dir / "checkpoints/round-0001").exists()  # only round 2 ran
    a = load_file(str(full_run(federation, tiny_cfg) / "checkpoints/round-0002/weights.safetensors"))
    b = load_file(str(resumed_dir / "checkpoints/round-0002/weights.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= TOLERANCE, f"max |uninterrupted - resumed| = {worst}"
