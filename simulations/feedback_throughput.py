"""Acknowledged feedback events per second of the running service (`crossrec serve` with serve.feedback-db).

Several clients on loopback post feedback for --seconds per batch size; an event counts once the service has
answered 200 (the batch is then on disk: SQLite WAL, fsync per commit). Each event is a list of 10 shown items
with one click, like the service's own answers.

    python -m simulations.feedback_throughput --checkpoint runs/latest [--scenario shop] [--batches 1,50]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from shared.checkpoint import checkpoint_round, read_checkpoint
from shared.data import load_scenario

from .serving_cli import running_service


def burst(url: str, items: list[str], scenario: str, batch: int, clients: int, seconds: float) -> float:
    """Acknowledged events per second over ``seconds`` from ``clients`` threads posting ``batch`` events each."""
    acknowledged, stop = [0] * clients, threading.Event()

    def client(n: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                events = [
                    {
                        "request_id": uuid.uuid4().hex,
                        "scenario": scenario,
                        "user_id": f"user-{n}",
                        "served": 1.0,
                        "shown": [
                            {"item_id": item, "position": p, "propensity": 1.0, "expected": 0.1}
                            for p, item in enumerate(items)
                        ],
                        "outcomes": [{"item_id": items[0], "objective": "engagement", "value": 1, "time": 2.0}],
                    }  # fmt: skip
                    for _ in range(batch)
                ]
                if http.post(url + "/feedback", json={"events": events}).status_code == 200:
                    acknowledged[n] += batch

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(acknowledged) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run folder or checkpoint")
    parser.add_argument("--scenario", default="shop")
    parser.add_argument("--batches", default="1,50", help="events per request")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="runs/feedback-throughput")
    args = parser.parse_args(argv)
    _, folder, _ = read_checkpoint(args.checkpoint)
    data = checkpoint_round(folder)[0] / "data" / args.scenario
    items = load_scenario(data).item_ids[:10]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "feedback.sqlite"
        with running_service(folder, [data], Path(args.out) / "cache", run_config=f"serve.feedback-db={db}") as url:
            for batch in (int(b) for b in args.batches.split(",")):
                results[batch] = burst(url, items, args.scenario, batch, args.clients, args.seconds)
                print(f"batch {batch:>4}: {results[batch]:8.0f} acknowledged events/s ({args.clients} clients)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps({"clients": args.clients, "events_per_second": results}) + "\n")
    print(f"wrote {out / 'throughput.json'}")


if __name__ == "__main__":
    main()
