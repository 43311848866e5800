"""Latency of the running HTTP service (`crossrec serve`) for large catalogs, from a client on loopback.

For each catalog size a synthetic scenario is written (item texts of demo-topic words, a small log),
the service is started on it with a trained checkpoint, and requests go over HTTP:
single-request latency (sequential, keep-alive) p50/p99 with MMR (lambda 0.2) and without, and
throughput with several concurrent clients. Item vectors of the synthetic catalogs are unit vectors
placed in the service's item-vector cache (``--vectors random``: independent, the hardest case for an
index; ``clustered``: around 1,000 topic centres, as text embeddings are): encoding 100,000 texts with
MiniLM on a 2-core CPU takes minutes and is precomputation, not request work; everything a request does
(user model, candidate retrieval or the head over the whole catalog, utility, top-k, MMR, JSON) is the
real service. Each size is served by both ``--modes``: ``exact`` (the head scores every item) and ``ann``
(two stages: the HNSW index retrieves ``serve.ann-candidates``, the head re-ranks them), and the
candidate stage's recall is measured in-process against exact scoring: the share of the exact top 100
(the default utility over every item) among the candidates, and of the exact top 10 in the served 10.

    python -m simulations.serve_latency --run runs/latest [--sizes 10000,100000] [--vectors clustered]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from client.serving import Recommender, Request, cache_name, save_table
from shared.checkpoint import read_checkpoint, weights_digest
from shared.config import ServeConfig
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


def item_vectors(size: int, dim: int, kind: str) -> torch.Tensor:
    """(size, dim) unit vectors: independent (``random``) or around 1,000 random centres (``clustered``)."""
    gen = torch.Generator().manual_seed(size)
    noise = torch.randn(size, dim, generator=gen)
    if kind == "clustered":
        centres = torch.nn.functional.normalize(torch.randn(1000, dim, generator=gen), dim=-1)
        noise = centres[torch.randint(1000, (size,), generator=gen)] + noise / dim**0.5
    return torch.nn.functional.normalize(noise, dim=-1)


def recall(folder: Path, data: Path, cache: Path, size: int, users: int, rng: np.random.Generator) -> dict[str, float]:
    """Recall of the candidate stage against the head over every item, on ``users`` random 5-item histories."""
    two = Recommender(folder, [data], cache, ServeConfig(ann_min_items=1))
    exact = Recommender(folder, [data], cache, ServeConfig(ann_min_items=0))  # same cached item vectors
    catalog = two.catalogs[f"bench{size}"]
    at_100, at_10 = [], []
    for _ in range(users):
        request = Request(scenario=catalog.scenario.name, history=[f"i{j}" for j in rng.integers(size, size=5)])
        best = [catalog.index[str(i["item_id"])] for i in exact.recommend(dataclasses.replace(request, k=100))]
        user, _ = two._user(request, catalog)
        found = two.candidates(user, catalog, two.cfg.serve.ann_candidates)
        assert found is not None
        at_100.append(len(set(best) & set(found.tolist())) / 100)
        got = {catalog.index[str(i["item_id"])] for i in two.recommend(request)}
        at_10.append(len(got & set(best[:10])) / 10)
    return {"candidate_recall_at_100": float(np.mean(at_100)), "served_recall_at_10": float(np.mean(at_10))}


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
    parser.add_argument("--modes", default="exact,ann", help="exact: the head scores every item; ann: two stages")
    parser.add_argument("--vectors", default="clustered", choices=["clustered", "random"])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--recall-users", type=int, default=200)
    parser.add_argument("--out", default="runs/serve-latency")
    args = parser.parse_args(argv)
    out = Path(args.out)
    _, folder, weights = read_checkpoint(args.run)
    dim = int(weights["user.out.weight"].shape[0])  # the encoder's hidden size
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, float]] = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        data = out / f"catalog-{size}"
        texts = synthetic_catalog(data, size, rng)
        cache = out / f"cache-{args.vectors}"
        cache.mkdir(parents=True, exist_ok=True)
        table = item_vectors(size, dim, args.vectors)
        save_table(cache / cache_name(weights_digest(weights), texts), table, torch.zeros(size), torch.zeros(1))
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            setting = {"exact": "serve.ann-min-items=0", "ann": "serve.ann-min-items=1"}[mode]
            started = time.perf_counter()
            with running_service(folder, [data], cache, 900.0, run_config=setting) as url:
                key = f"{size} {mode}"
                results[key] = {"ready_s": time.perf_counter() - started}
                results[key] |= measure(url + "/recommend", size, args.requests, rng)
            if mode == "ann":
                results[key] |= recall(folder, data, cache, size, args.recall_users, rng)
            print(f"{key}: {json.dumps(results[key])}", flush=True)
    header = f"{'items':>8} {'mode':>5} {'p50 ms':>7} {'p99 ms':>7} {'p50 top-k':>9} {'p99 top-k':>9}"
    print(f"\n{header} {'req/s (4 clients)':>17} {'recall@100':>10} {'recall@10':>9} {'ready s':>7}")
    for key, r in results.items():
        items, mode = key.split()
        print(
            f"{int(items):8d} {mode:>5} {r['mmr_p50_ms']:7.1f} {r['mmr_p99_ms']:7.1f} {r['topk_p50_ms']:9.1f} "
            f"{r['topk_p99_ms']:9.1f} {r['throughput_rps_4_clients']:17.1f} "
            f"{r.get('candidate_recall_at_100', 1.0):10.3f} {r.get('served_recall_at_10', 1.0):9.3f} "
            f"{r['ready_s']:7.0f}"
        )
    (out / f"latency-{args.vectors}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / f'latency-{args.vectors}.json'}")


if __name__ == "__main__":
    main()
