"""Deployed federation, client side: one scenario's long-lived client daemon (a Flower SuperNode).

``crossrec client`` runs :func:`run_client`: it checks the CA certificate, the SuperNode's
authentication key and the scenario's data (``load_scenario`` + ``prepare``, the same checks training
makes), refuses to start with a message naming what is wrong, and then becomes ``flower-supernode``
(same process id) with ``scenario``, ``data-dir`` and ``state-dir`` in its node config. The SuperNode
reconnects by itself when the SuperLink restarts; a restarted daemon rejoins with the same node identity
(its key).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from server.certs import check_ca_certificate, check_supernode_key
from server.launch import executable, flower_env, toml_value
from shared.config import Config
from shared.data import load_scenario

from .training import prepare

logger = logging.getLogger(__name__)

DEFAULT_RUNTIME_PORT = 9094  # flower-supernode's local Runtime API port


def check_client(
    data_dir: Path, ca: Path, key: Path, scenario: str | None, overrides: Mapping[str, bool | int | float | str]
) -> tuple[str, str]:
    """Raise a clear error unless certificate, key and data are usable; return (scenario, description)."""
    check_ca_certificate(ca)
    check_supernode_key(key)
    cfg = Config.from_run_config({**Config().to_flat(), **overrides})
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data {data_dir}: no such scenario folder")
    data = prepare(load_scenario(data_dir, lenient=cfg.data.lenient), cfg)
    found = data.scenario.name
    if scenario is not None and scenario != found:
        raise ValueError(f"--scenario {scenario!r}, but {data_dir}/scenario.json names scenario {found!r}")
    return found, (
        f"scenario {found}: {data.scenario.num_items} items, {len(data.scenario.users)} users, "
        f"{data.num_examples} training examples, {len(data.split.eval_users)} evaluated users"
    )


def supernode_command(
    superlink: str, ca: Path, key: Path, scenario: str, data_dir: Path, state_dir: Path, port: int
) -> list[str]:
    """The ``flower-supernode`` command line (TLS verified with ``ca``, authenticated with ``key``)."""
    settings = {"scenario": scenario, "data-dir": str(data_dir), "state-dir": str(state_dir)}
    node_config = " ".join(f"{k}={toml_value(v)}" for k, v in settings.items())
    return [
        executable("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        node_config,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def run_client(
    superlink: str,
    data_dir: Path,
    ca: Path,
    key: Path,
    state_dir: Path,
    scenario: str | None = None,
    port: int = DEFAULT_RUNTIME_PORT,
    overrides: Mapping[str, bool | int | float | str] | None = None,
) -> None:
    """Validate, then replace this process with the scenario's SuperNode (does not return)."""
    data_dir, ca, key, state_dir = (p.expanduser().resolve() for p in (data_dir, ca, key, state_dir))
    name, description = check_client(data_dir, ca, key, scenario, overrides or {})
    state_dir.mkdir(parents=True, exist_ok=True)
    command = supernode_command(superlink, ca, key, name, data_dir, state_dir, port)
    logger.info(description)
    logger.info("SuperNode for %s -> %s (TLS, authenticated), state %s", name, superlink, state_dir)
    os.execve(command[0], command, flower_env(state_dir / "flwr-home"))
