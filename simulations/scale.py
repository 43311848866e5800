"""Round time against the number of clients: the demo federation simulated with each scenario's users
split across ``data.shards`` clients (3 x shards SuperNodes on this machine), the same robust aggregation
at every size. Each client runs the same ``train.local-steps``, so the training work of a round grows with
the number of clients; the table gives the round time and the time per client, from each checkpoint's
``seconds`` (training, aggregation and evaluation of the round). Writes ``OUT/scale.json``.

    .venv/bin/python -m simulations.scale --shards 1,10 --run-config "train.local-steps=5 fed.rounds=2"
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from server.launch import stop_children_on_signal
from shared.config import Config
from shared.demo import write_demo_federation
from shared.files import atomic_write_bytes

from .simulate import CACHE, federated_rows, parse_overrides, run_cache

log = logging.getLogger(__name__)


def scale(out: Path, shards: list[int], run_config: str = "") -> list[dict[str, float]]:
    """One federated simulation of the demo federation per entry of ``shards``; rows of the table."""
    data = out / "data"
    if not data.is_dir():
        write_demo_federation(data, seed=0)
    rows = []
    for count in shards:
        run_dir = (out / f"shards-{count}").resolve()
        if run_dir.exists():
            raise ValueError(f"{run_dir} exists: choose a new --out")
        base = {"run.cache-dir": str(out.resolve() / CACHE), **parse_overrides(run_config)}
        overrides = base | {"data.dir": str(data.resolve()), "data.shards": count}
        cfg = Config.from_run_config({**Config().to_flat(), **overrides})
        clients = len(cfg.data.scenario_names) * count
        overrides["fed.min-clients"] = clients
        log.info("%d clients (%d per scenario), %d rounds", clients, count, cfg.fed.rounds)
        with run_cache(out.resolve(), cfg):
            federated_rows(run_dir, overrides, clients, cfg.fed.rounds)
        metas = [json.loads(p.read_text()) for p in sorted(run_dir.glob("checkpoints/round-*/meta.json"))]
        seconds = [float(m["seconds"]) for m in metas]
        dropped = sum(len(m["dropped"]) for m in metas)
        later = seconds[1:] or seconds  # the first round also starts the simulation runtime
        rows.append(
            {
                "clients": clients,
                "rounds": len(metas),
                "first_round_s": seconds[0],
                "round_s": statistics.mean(later),
                "per_client_s": statistics.mean(later) / clients,
                "dropped_replies": dropped,
            }
        )
    atomic_write_bytes(out / "scale.json", (json.dumps(rows, indent=2) + "\n").encode())
    base_row = rows[0]
    print(f"{'clients':>8} {'round s':>9} {'x':>6} {'s per client':>13} {'first round s':>14} {'dropped':>8}")
    for row in rows:
        ratio = row["round_s"] / base_row["round_s"]
        print(
            f"{row['clients']:>8} {row['round_s']:>9.1f} {ratio:>6.2f} {row['per_client_s']:>13.2f} "
            f"{row['first_round_s']:>14.1f} {row['dropped_replies']:>8}"
        )
    print(f"wrote {out / 'scale.json'}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="1,10", help="clients per scenario, one run each (comma-separated)")
    parser.add_argument("--run-config", default="train.local-steps=5 fed.rounds=2", help="overrides of the defaults")
    parser.add_argument("--out", default="runs/scale", help="output folder (data, one run per size, scale.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with stop_children_on_signal():  # SIGTERM / Ctrl-C: the Flower processes below go first
        scale(Path(args.out), [int(s) for s in args.shards.split(",") if s.strip()], args.run_config)


if __name__ == "__main__":
    main()
