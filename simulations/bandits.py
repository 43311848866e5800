"""Exploration policies against simulated users who know what they like (the demo generator's truth).

A trained checkpoint serves one demo scenario. Each request comes from a random user; the policy makes the
list exactly as the service does (``client.serving.make_list``: the model's utility, corrected by the items'
feedback, ranks the first slots, the policy fills the exploration slots); the user clicks each listed item
with the generator's true probability (``shared.demo.DemoTruth.click_probability``: the user's topics, the
item's appeal and its quality, which the engagement log never showed); the clicks are the feedback.
Regret of a request = the expected clicks of the user's best possible list minus those of the list served.

    python -m simulations.bandits --checkpoint runs/latest [--scenario shop] [--requests 10000] [--seeds 0,1,2,3,4]

Prints the table, writes ``bandits.json`` and ``regret.png`` (cumulative regret, mean over seeds) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import t as student_t
from tqdm import tqdm

from client.bandit import ItemStats
from client.serving import Recommender, Request, make_list
from shared.checkpoint import checkpoint_round, read_checkpoint
from shared.config import POLICIES, ServeConfig
from shared.demo import demo_truth

logger = logging.getLogger(__name__)


@torch.no_grad()
def model_view(rec: Recommender, scenario: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(utility (U, N), expected reward (U, N), item vectors (N, H)) of every user of the scenario's log,
    as the service computes them."""
    catalog = rec.catalogs[scenario]
    weights = rec._weights(Request(scenario=scenario))
    scores, expected = [], []
    for user in catalog.scenario.users:
        vector, _ = rec._user(Request(scenario=scenario, user_id=user), catalog)
        _, utility, reward = rec.scored(catalog, vector, weights)
        scores.append(utility)
        expected.append(reward)
    return torch.stack(scores), torch.stack(expected), catalog.table[:, : catalog.model.head.dim]


def simulate(
    policy: str,
    seed: int,
    view: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    truth: np.ndarray,
    serve: ServeConfig,
    requests: int,
    k: int,
) -> dict[str, np.ndarray]:
    """Per request: expected clicks of the list served, and of the best list for that user."""
    scores, expected, vectors = view
    rng = np.random.default_rng(seed)
    users = rng.integers(len(truth), size=requests)
    clicks = rng.random((requests, k))  # common random numbers: every policy sees the same users and coins
    stats = ItemStats.none(truth.shape[1])
    best = -np.sort(-truth, axis=1)[:, :k].sum(axis=1)
    served, optimal = np.zeros(requests), best[users]
    policy_rng = np.random.default_rng(seed + 1_000_003)
    for t, u in enumerate(users):
        listed = make_list(scores[u], expected[u], stats, vectors, k, 0.0, serve, policy, policy_rng)
        rows = np.asarray(listed.rows)
        chance = truth[u, rows]
        served[t] = chance.sum()
        for row, clicked, p in zip(rows, clicks[t, : len(rows)] < chance, expected[u, rows].tolist(), strict=True):
            stats.add(int(row), float(clicked), p)
    return {"served": served, "optimal": optimal}


def t_quantile(q: float, df: int) -> float:
    return float(student_t.ppf(q, df))


def plot(curves: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for policy, regret in curves.items():  # (seeds, requests)
        cumulative = regret.cumsum(axis=1)
        mean = cumulative.mean(axis=0)
        ax.plot(np.arange(1, len(mean) + 1), mean, label=policy)
        ax.fill_between(np.arange(1, len(mean) + 1), cumulative.min(axis=0), cumulative.max(axis=0), alpha=0.15)
    ax.set_xlabel("requests")
    ax.set_ylabel("cumulative regret (expected clicks)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a demo run folder or checkpoint (crossrec simulate)")
    parser.add_argument("--scenario", default="shop")
    parser.add_argument("--demo-seed", type=int, default=0, help="the seed the demo data was made with")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--run-config", default="", help='serve.* overrides, e.g. "serve.prior-strength=4"')
    parser.add_argument("--out", default="runs/bandits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .serving_cli import serve_config

    scenario, truth = demo_truth(args.demo_seed)[args.scenario]
    _, folder, _ = read_checkpoint(args.checkpoint)
    run, _ = checkpoint_round(folder)
    data = run / "data" / args.scenario
    rec = Recommender(folder, [data], Path(args.out) / "cache", serve=serve_config(args.run_config).serve)
    if rec.catalogs[args.scenario].scenario.texts != scenario.texts:
        raise ValueError(f"{data} is not the demo generator's '{args.scenario}' (seed {args.demo_seed})")
    view = model_view(rec, args.scenario)
    probability = truth.click_probability()[
        [scenario.users.index(u) for u in rec.catalogs[args.scenario].scenario.users]
    ]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, np.ndarray] = {}
    for policy in args.policies.split(","):
        started, regret, first = time.perf_counter(), [], []  # per seed
        for seed in tqdm(seeds, desc=policy, leave=False):
            out = simulate(policy, seed, view, probability, rec.cfg.serve, args.requests, args.k)
            regret.append(out["optimal"] - out["served"])
            first.append(out["served"][:1000].sum())
        curves[policy] = np.stack(regret)
        results[policy] = {
            "cumulative_regret": [float(r.sum()) for r in regret],
            "first_1000_clicks": [float(f) for f in first],
            "seconds": [time.perf_counter() - started],
        }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    greedy = results.get("greedy")
    print(f"{'policy':<15} {'cum. regret':>12} {'vs greedy':>10} {'95% interval':>18} {'first 1,000 vs greedy':>22}")
    for policy, row in results.items():
        total = np.asarray(row["cumulative_regret"])
        line = f"{policy:<15} {total.mean():>12.1f}"
        if greedy is not None:
            cut = 1.0 - total / np.asarray(greedy["cumulative_regret"])  # paired by seed
            half = t_quantile(0.975, len(cut) - 1) * cut.std(ddof=1) / np.sqrt(len(cut)) if len(cut) > 1 else np.nan
            early = np.asarray(row["first_1000_clicks"]) / np.asarray(greedy["first_1000_clicks"]) - 1.0
            row["regret_cut"], row["first_1000_change"] = cut.tolist(), early.tolist()
            line += (
                f" {-cut.mean():>+10.1%} [{-cut.mean() - half:+.1%}, {-cut.mean() + half:+.1%}] {early.mean():>+21.1%}"
            )
        print(line)
    report = {
        "checkpoint": str(run),
        "scenario": args.scenario,
        "requests": args.requests,
        "seeds": seeds,
        "k": args.k,
        "serve": dataclasses.asdict(rec.cfg.serve),
        "policies": results,
    }
    (out_dir / "bandits.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(curves, out_dir / "regret.png")
    print(f"wrote {out_dir / 'bandits.json'} and {out_dir / 'regret.png'}")


if __name__ == "__main__":
    main()
