"""crossrec ServerApp: parse the config once, run the rounds."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from shared.config import Config

from .rounds import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Federated rounds over every connected scenario client."""
    cfg = Config.from_run_config(context.run_config)
    run_dir = Path(cfg.run.dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    logging.getLogger("flwr").info("crossrec run folder: %s", run_dir)
    run_federation(grid, cfg, run_dir)
