"""Latency of the running HTTP service (`crossrec serve`) for large catalogs, from a client on loopback.

For each catalog size a synthetic scenario is written (item texts of demo-topic words, a small log),
the service is started on it with a trained checkpoint, and requests go over HTTP:
single-request latency (sequential, keep-alive) p50/p99 with MMR (lambda 0.2) and without, and
throughput with several concurrent clients. Item vectors of the synthetic catalogs are random unit
vectors placed in the service's item-vector cache: encoding 100,000 texts with MiniLM on a 2-core
CPU takes minutes and is precomputation, not request work; everything a request does (user model,
head over the whole catalog, utility, exact top-k, MMR, JSON) is the real service.

    python -m simulations.serve_latency --run runs/latest [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from client.serving import cache_name, save_table
from shared.checkpoint import read_checkpoint, weights_digest
from shared.demo import GENERIC, TOPICS

from .serving_cli import running_service


def synthetic_catalog(folder: Path, size: int, rng: np.random.Generator) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    words = [w for ws in TOPICS.values() for w in ws]
    texts = [f"{rng.choice(GENERIC)} {' '.join(rng.choice(words, size=3))} #{i}" for i in range(size)]
    (folder / "scenario.json").write_text(json.dumps({"name": f"bench{size}", "objectives": ["engagement"]}))
    with (folder / "items.jsonl").open("w") as fh:
        fh.writelines(json.dumps({"item_id": f"i{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    with (folder / "interactions.jsonl").open("w") as fh:
        for u in range(50):
            for t, item in enumerate(rng.integers(size, size=8)):
                fh.write(json.dumps({"user_id": f"u{u}", "item_id": f"i{item}", "timestamp": t}) + "\n")
    return texts


def measure(url: str, size: int, requests: int, rng: np.random.Generator) -> dict[str, float]:
    def body(diversity: float) -> dict[str, object]:
        history = [f"i{j}" for j in rng.integers(size, size=5)]
        return {"scenario": f"bench{size}", "history": history, "k": 10, "diversity": diversity}

    out: dict[str, float] = {}
    with httpx.Client(timeout=60) as client:
        for _ in range(20):  # warm-up
            client.post(url, json=body(0.2)).raise_for_status()
        for diversity in (0.2, 0.0):
            times = []
            for _ in range(requests):
                b = body(diversity)
                t0 = time.perf_counter()
                client.post(url, json=b).raise_for_status()
                times.append(time.perf_counter() - t0)
            key = "mmr" if diversity else "topk"
            out[f"{key}_p50_ms"] = float(np.percentile(times, 50) * 1000)
            out[f"{key}_p99_ms"] = float(np.percentile(times, 99) * 1000)
    done, stop = [0], threading.Event()
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                client.post(url, json=body(0.2)).raise_for_status()
                with lock:
                    done[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(10.0)
    stop.set()
    for t in threads:
        t.join()
    out["throughput_rps_4_clients"] = done[0] / (time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run",
        default="runs/latest",
        help="run folder (the round chosen on validation is served), checkpoint folder or adapter export",
    )
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", default="runs/serve-latency")
    args = parser.parse_args(argv)
    out = Path(args.out)
    _, folder, weights = read_checkpoint(args.run)
    dim = int(weights["user.out.weight"].shape[0])  # the encoder's hidden size
    rng = np.random.default_rng(0)
    results = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        data = out / f"catalog-{size}"
        texts = synthetic_catalog(data, size, rng)
        cache = out / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        table = torch.nn.functional.normalize(
            torch.randn(size, dim, generator=torch.Generator().manual_seed(size)), dim=-1
        )
        save_table(cache / cache_name(weights_digest(weights), texts), table, torch.zeros(size))
        with running_service(folder, [data], cache) as url:
            results[size] = measure(url + "/recommend", size, args.requests, rng)
        print(f"{size} items: {json.dumps(results[size])}", flush=True)
    print(f"\n{'items':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50 top-k':>10} {'p99 top-k':>10} {'req/s (4 clients)':>18}")
    for size, r in results.items():
        print(
            f"{size:8d} {r['mmr_p50_ms']:8.1f} {r['mmr_p99_ms']:8.1f} {r['topk_p50_ms']:10.1f} "
            f"{r['topk_p99_ms']:10.1f} {r['throughput_rps_4_clients']:18.1f}"
        )
    (out / "latency.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2) + "\n")
    print(f"wrote {out / 'latency.json'}")


if __name__ == "__main__":
    main()
