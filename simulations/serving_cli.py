"""``crossrec recommend`` and ``crossrec serve``: argument handling around client.serving."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from client.serving import Recommender, Request, RequestError
from server.launch import die_with_parent, free_port, stop_tree, wait_healthy
from shared.config import Config

from .simulate import parse_overrides

RELOAD_TOKEN = "CROSSREC_RELOAD_TOKEN"  # environment variable holding the /reload token (never a flag: ps shows flags)


def serve_config(text: str) -> Config:
    overrides = parse_overrides(text)
    bad = [k for k in overrides if not k.startswith("serve.")]
    if bad:
        raise ValueError(f"--run-config: only serve.* keys can change at serving time, got {bad}")
    return Config.from_run_config(overrides)


def load(args: argparse.Namespace, checkpoint: str) -> Recommender:
    return Recommender(
        checkpoint, args.data, args.cache_dir, serve=serve_config(args.run_config).serve, state_dirs=args.state_dir
    )


def parse_weights(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--weights item {part!r} is not objective=number") from None
        if not sep:
            raise ValueError(f"--weights item {part!r} is not objective=number")
    return out


def recommend(args: argparse.Namespace) -> None:
    rec = load(args, args.checkpoint)
    scenario = args.scenario or (next(iter(rec.catalogs)) if len(rec.catalogs) == 1 else None)
    if scenario is None:
        raise ValueError(f"--scenario is needed: the service has {sorted(rec.catalogs)}")
    request = Request(
        scenario=scenario,
        user_id=args.user,
        history=args.history.split(",") if args.history else None,
        history_texts=args.history_text,
        k=args.k,
        weights=parse_weights(args.weights),
        diversity=args.diversity,
        exclude_seen=args.exclude_seen,
    )
    try:
        items = rec.recommend(request)
    except RequestError as exc:
        raise ValueError(str(exc)) from None
    print(json.dumps({"scenario": scenario, "checkpoint": rec.checkpoint_id, "items": items}, indent=2))


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from client.feedback import FeedbackStore
    from client.service import create_app

    rec = load(args, args.checkpoint)
    serve = rec.cfg.serve
    if args.ab_checkpoint and not serve.ab_share > 0:
        raise ValueError("--ab-checkpoint serves arm B: give arm B its share of users with serve.ab-share")
    arm_b = load(args, args.ab_checkpoint) if args.ab_checkpoint else None
    store = FeedbackStore(serve.feedback_db) if serve.feedback_db else None
    root = Path(args.reload_root) if args.reload_root else None
    app = create_app(rec, partial(load, args), root, os.environ.get(RELOAD_TOKEN), store, arm_b)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


@contextlib.contextmanager
def running_service(*args: Any, **kwargs: Any) -> Iterator[str]:
    """``crossrec serve`` as a separate process on a free loopback port (the arguments of
    :func:`service_process`); yields its URL, stops it on exit."""
    with service_process(*args, **kwargs) as (_, url):
        yield url


@contextlib.contextmanager
def service_process(
    checkpoint: str | Path,
    data: Sequence[str | Path],
    cache_dir: str | Path,
    startup_timeout: float = 300.0,
    reload_root: str | Path | None = None,
    reload_token: str | None = None,
    run_config: str = "",
    ab_checkpoint: str | Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``crossrec serve`` as a separate process on a free loopback port; yields (the process, its URL) and stops
    it on exit. ``ab_checkpoint``: arm B's model."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "simulations.cli",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--cache-dir",
        str(cache_dir),
        "--port",
        str(port),
    ]
    for folder in data:
        command += ["--data", str(folder)]
    env = dict(os.environ)
    if run_config:
        command += ["--run-config", run_config]
    if ab_checkpoint is not None:
        command += ["--ab-checkpoint", str(ab_checkpoint)]
    if reload_root is not None:
        command += ["--reload-root", str(reload_root)]
        env[RELOAD_TOKEN] = reload_token or ""
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url + "/health", startup_timeout, "crossrec serve")
        yield proc, url
    finally:
        stop_tree(proc)
