"""Start Flower processes for crossrec and stop every process they started, by PID.

All Flower processes get a project-local ``FLWR_HOME``, no runtime dependency installation, no
telemetry, no update checks and no hub access.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import psutil

CONNECTION = "crossrec-local"


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process crossrec starts."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # flower-superexec
    )
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def executable(name: str) -> str:
    """A console script of this environment (beside the running interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"'{name}' not found; is crossrec installed in this environment?")
    return found


def stop_tree(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a process and all its descendants (collected before anything is signalled), by PID."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    stop_processes(tree, grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def stop_processes(tree: list[psutil.Process], grace: float = 10.0) -> None:
    """SIGTERM to each process, SIGKILL to those still alive after ``grace`` seconds; waits for them."""
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)


@contextlib.contextmanager
def stop_children_on_signal() -> Iterator[None]:
    """While inside: on SIGTERM or SIGINT (Ctrl-C) first stop every process below this one (Flower SuperLink, simulation
    runtime, Ray workers; collected by PID before anything is signalled), then raise in the main thread
    (SystemExit 143 / KeyboardInterrupt) so its clean-up runs and nothing outlives a stopped job.

    Needed because the job's own threads may be blocked waiting on those processes: stopping the
    processes is what lets them return."""

    def handler(signum: int, frame: object) -> None:
        stop_processes(psutil.Process().children(recursive=True))
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)


def die_with_parent() -> None:
    """In a child before exec (Linux): get SIGTERM when the parent dies, so a crashed parent leaves nothing running."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_healthy(
    proc: subprocess.Popen[bytes], url: str, timeout: float, what: str, ca_file: Path | None = None
) -> None:
    """Wait until ``url`` answers 2xx (an https URL verified against ``ca_file``); raise if the process exits
    first or ``timeout`` passes."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            detail = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode} {detail}".strip())
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0, verify=verify).is_success:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not healthy within {timeout:.0f}s")
        time.sleep(0.25)


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None = None) -> str:
    """Write ``FLWR_HOME/config.toml`` naming one SuperLink connection (TLS when ``root_certificates`` is
    given, else insecure) as the default; returns the connection name."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {toml_value(str(root_certificates.resolve()))}\n"
        if root_certificates
        else "insecure = true\n"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}'
    )
    return CONNECTION


def start_logged(
    command: list[str], flwr_home: Path, log_file: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a Flower process in its own session, output appended to ``log_file``; it dies with its parent."""
    with log_file.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=flower_env(flwr_home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def flwr_cli(flwr_home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``flwr ARGS...`` against the connections of ``flwr_home``, output captured."""
    return subprocess.run(
        [executable("flwr"), *args], env=flower_env(flwr_home), capture_output=True, text=True, timeout=timeout
    )


@contextlib.contextmanager
def simulation_superlink(flwr_home: Path, log_file: Path, startup_timeout: float = 60.0) -> Iterator[str]:
    """A SuperLink in simulation mode on a free loopback port; yields the connection name.

    Writes ``FLWR_HOME/config.toml`` with that connection. On exit the SuperLink and every process
    below it (simulation runtime, ServerApp, Ray workers) are stopped.
    """
    port = free_port()
    write_connection(flwr_home, f"127.0.0.1:{port}")
    command = [
        executable("flower-superlink"),
        "--simulation",
        "--insecure",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(flwr_home / "state.db"),
    ]
    proc = start_logged(command, flwr_home, log_file)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", startup_timeout, f"flower-superlink (see {log_file})")
        yield CONNECTION
    finally:
        stop_tree(proc)


def toml_value(value: bool | int | float | str) -> str:
    """A run-config value as TOML (for ``flwr run --run-config``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def flwr_run(
    app_dir: Path,
    flwr_home: Path,
    run_config: Mapping[str, bool | int | float | str],
    num_supernodes: int,
    cpus_per_client: int = 1,
) -> int:
    """``flwr run APP CONNECTION --stream`` on the simulation SuperLink; returns its exit code."""
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    command = [
        executable("flwr"),
        "run",
        str(app_dir),
        CONNECTION,
        "--stream",
        "--run-config",
        overrides,
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
    ]
    proc = subprocess.Popen(command, env=flower_env(flwr_home), start_new_session=True, preexec_fn=die_with_parent)
    try:
        return proc.wait()
    finally:
        stop_tree(proc)
