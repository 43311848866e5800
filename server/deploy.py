"""Deployed federation, server side: a SuperLink for crossrec and the runs submitted to it.

``crossrec superlink`` runs :func:`serve_superlink`: a ``flower-superlink`` with TLS, SuperNode
authentication on (only registered public keys may connect), runtime dependency installation off and
its own state folder (``state.db``, ``superlink.log``, ``flwr-home/``; relative run folders land in
``runs/`` there); it registers the given SuperNode public keys and keeps running until stopped.
``crossrec submit`` runs :func:`submit`: the crossrec app with a run config, its server log streamed,
and an exit status that says whether the run completed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

from shared.config import Config

from .certs import check_ca_certificate
from .launch import (
    CONNECTION,
    die_with_parent,
    executable,
    flower_env,
    flwr_cli,
    start_logged,
    stop_tree,
    toml_value,
    wait_healthy,
    write_connection,
)

APP_DIR = Path(__file__).resolve().parents[1]
LOG_FILE = "superlink.log"
logger = logging.getLogger(__name__)


def superlink_command(state_dir: Path, host: str, port: int, ca: Path, cert: Path, key: Path) -> list[str]:
    """The ``flower-superlink`` command line: TLS, SuperNode authentication, no runtime installs."""
    return [
        executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(state_dir / "state.db"),
    ]


def local_address(host: str, port: int) -> str:
    """Where a process on the SuperLink's own host reaches it."""
    return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def _check_files(**paths: Path) -> None:
    for what, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"--{what} {path} does not exist")


@contextlib.contextmanager
def running_superlink(
    state_dir: Path, host: str, port: int, ca: Path, cert: Path, key: Path, startup_timeout: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """A SuperLink (see :func:`superlink_command`) that is healthy; stopped, with its children, on exit."""
    _check_files(ca=ca, cert=cert, key=key)
    check_ca_certificate(ca)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = state_dir / "flwr-home"
    write_connection(flwr_home, local_address(host, port), ca)  # lets `FLWR_HOME=... flwr ...` reach it
    log_file = state_dir / LOG_FILE
    command = superlink_command(state_dir, host, port, ca.resolve(), cert.resolve(), key.resolve())
    proc = start_logged(command, flwr_home, log_file, cwd=state_dir)
    try:
        url = f"https://{local_address(host, port)}/health"
        wait_healthy(proc, url, startup_timeout, f"flower-superlink (see {log_file})", ca_file=ca)
        yield proc
    finally:
        stop_tree(proc)


def register_supernodes(flwr_home: Path, public_keys: Sequence[Path]) -> list[str]:
    """Register SuperNode public keys (OpenSSH ECDSA) with the SuperLink of ``flwr_home``'s connection.

    A key registered before (the SuperLink keeps them in its state) is fine. Returns one line per key.
    """
    lines = []
    for key in public_keys:
        if not key.is_file():
            raise FileNotFoundError(f"--register {key}: no such public key file")
        done = flwr_cli(flwr_home, "supernode", "register", str(key), CONNECTION, "--format", "json")
        output = done.stdout + done.stderr
        try:  # (`flwr --format json` reports most failures as {"success": false, ...} with exit code 0)
            registered = done.returncode == 0 and json.loads(done.stdout).get("success") is True
        except ValueError:
            registered = False
        if registered:
            lines.append(f"registered {key}")
        elif "already in use" in output:
            lines.append(f"already registered {key}")
        else:
            raise RuntimeError(f"registering SuperNode key {key} failed: {output.strip()[-1000:]}")
    return lines


def serve_superlink(
    state_dir: Path, host: str, port: int, ca: Path, cert: Path, key: Path, register: Sequence[Path]
) -> None:
    """Run a SuperLink in the foreground until SIGINT/SIGTERM; print where it is and what is registered."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt), running_superlink(state_dir, host, port, ca, cert, key) as proc:
        logger.info("listening on %s:%d (TLS, SuperNode authentication on)", host, port)
        logger.info("state %s, log %s", state_dir.resolve(), state_dir.resolve() / LOG_FILE)
        for line in register_supernodes(state_dir.resolve() / "flwr-home", register):
            logger.info(line)
        logger.info("ready; admit a new SuperNode with `crossrec register --state-dir %s KEY.pub`", state_dir)
        code = proc.wait()
        raise RuntimeError(f"flower-superlink exited with code {code}; see {state_dir / LOG_FILE}")
    logger.info("stopped")


def register_with_running(state_dir: Path, public_keys: Sequence[Path]) -> list[str]:
    """Admit SuperNode public keys to the SuperLink running on ``state_dir`` (``crossrec register``),
    without restarting it or any connected daemon."""
    flwr_home = state_dir.resolve() / "flwr-home"
    if not (flwr_home / "config.toml").is_file():
        raise FileNotFoundError(f"--state-dir {state_dir}: no SuperLink state here (start `crossrec superlink` first)")
    if not public_keys:
        raise ValueError("name at least one SuperNode public key (KEY.pub) to register")
    return register_supernodes(flwr_home, public_keys)


def run_status(flwr_home: Path, run_id: int) -> dict[str, object]:
    """The SuperLink's record of one run (``flwr list --run-id``)."""
    done = flwr_cli(flwr_home, "list", "--run-id", str(run_id), CONNECTION, "--format", "json")
    try:
        runs = json.loads(done.stdout)["runs"]
        return dict(runs[0])
    except (ValueError, KeyError, IndexError) as exc:
        raise RuntimeError(f"cannot read the status of run {run_id}: {(done.stdout + done.stderr)[-1000:]}") from exc


def submit(
    superlink: str,
    ca: Path,
    overrides: Mapping[str, bool | int | float | str],
    app_dir: Path = APP_DIR,
    poll: float = 5.0,
) -> int:
    """Submit the crossrec app to ``superlink`` (host:port, TLS verified with ``ca``), stream its log,
    and return its run id once it completed; raise when it failed or the SuperLink went away.

    Paths in ``overrides`` (``run.dir``, ``run.resume``, ``model.encoder``) are paths on the SuperLink's host.
    """
    _check_files(ca=ca)
    check_ca_certificate(ca)
    Config.from_run_config({**Config().to_flat(), **overrides})  # a bad key or value fails here, not remotely
    with tempfile.TemporaryDirectory(prefix="crossrec-flwr-") as home:
        flwr_home = Path(home)
        write_connection(flwr_home, superlink, ca)
        env = flower_env(flwr_home)
        command = [executable("flwr"), "run", str(app_dir), CONNECTION, "--format", "json"]
        if overrides:
            command += ["--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        try:
            run_id = int(json.loads(done.stdout)["run-id"])
        except (ValueError, KeyError) as exc:
            raise RuntimeError(
                f"submitting to {superlink} failed: {(done.stdout + done.stderr).strip()[-2000:]}"
            ) from exc
        logger.info("run %d on %s", run_id, superlink)
        logs = subprocess.Popen(
            [executable("flwr"), "log", str(run_id), CONNECTION, "--stream"],
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            logs.wait()  # the stream ends when the run has finished (or the SuperLink went away)
            while True:
                try:
                    status = run_status(flwr_home, run_id)
                except RuntimeError as exc:
                    raise RuntimeError(
                        f"lost the SuperLink at {superlink} during run {run_id} ({exc}); when it is back, resume "
                        "from the run folder's last checkpoint with run.resume"
                    ) from exc
                if str(status.get("status", "")).startswith("finished"):
                    break
                time.sleep(poll)
        finally:
            stop_tree(logs)
    if status["status"] != "finished:completed":
        raise RuntimeError(f"run {run_id} ended {status['status']}: {status.get('status-details', '')}")
    logger.info("run %d completed", run_id)
    return run_id
