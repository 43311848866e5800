"""Serving-time evaluation of a checkpoint on a labelled scenario (test split, leave-one-out):

1. the multi-objective trade-off: sweep the satisfaction weight and the MMR diversity lambda and
   measure NDCG@10 of the test item (engagement), NDCG@10 over users whose test item satisfied
   them, and intra-list diversity of the top 10; mark the Pareto-efficient settings; PNG + JSON;
2. cross-scenario requests: each user's history is replaced by texts of *another* scenario's items
   of the same categories (e.g. news stories for a video user) and the target scenario is ranked
   from those texts alone; NDCG@10 / HR@10 against the target scenario's popularity.

    python -m simulations.serving_eval --run runs/latest [--scenario video --source news]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from client.ranking import intra_list_diversity, mmr, utility  # noqa: E402
from client.serving import Recommender, Request  # noqa: E402
from shared.data import leave_one_out, train_counts  # noqa: E402

SAT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.5)


def dcg_at_10(ranked: list[int], target: int) -> float:
    return 1.0 / math.log2(ranked.index(target) + 2) if target in ranked[:10] else 0.0


def pareto(points: list[tuple[float, ...]]) -> list[bool]:
    """True where no other point is >= in every coordinate and > in one."""
    return [
        not any(all(q >= p for q, p in zip(other, pt, strict=True)) and other != pt for other in points)
        for pt in points
    ]


def tradeoff(rec: Recommender, scenario: str) -> list[dict[str, float]]:
    catalog = rec.catalogs[scenario]
    sc = catalog.scenario
    if "satisfaction" not in sc.labels:
        raise ValueError(f"scenario '{scenario}' has no satisfaction labels")
    split = leave_one_out(sc)
    users = []
    for i, u in enumerate(split.eval_users):
        history = np.append(split.train[u], split.valid_target[i])
        ids = [sc.item_ids[j] for j in history]
        vec, seen = rec._user(Request(scenario=scenario, history=ids), catalog)
        probs = rec.scored(catalog, vec, rec._weights(Request(scenario=scenario)), seen=seen)[0].float()  # as served
        users.append((probs, int(split.test_target[i]), sc.labels["satisfaction"][u][-1] == 1))
    rows = []
    for w in SAT_WEIGHTS:
        for lam in LAMBDAS:
            eng, sat, ild = [], [], []
            for probs, target, satisfied in users:
                scores = utility(probs, torch.tensor([1.0 - w, w]))
                ranked = mmr(scores, catalog.table, 10, lam, rec.cfg.serve.mmr_pool)
                eng.append(dcg_at_10(ranked, target))
                if satisfied:
                    sat.append(dcg_at_10(ranked, target))
                ild.append(intra_list_diversity(catalog.table[ranked]))
            rows.append(
                {
                    "satisfaction_weight": w,
                    "diversity": lam,
                    "ndcg@10": float(np.mean(eng)),
                    "ndcg@10_satisfied": float(np.mean(sat)),
                    "ild@10": float(np.mean(ild)),
                }
            )
    flags = pareto([(r["ndcg@10"], r["ndcg@10_satisfied"], r["ild@10"]) for r in rows])
    for row, flag in zip(rows, flags, strict=True):
        row["pareto"] = flag
    return rows


def cross_scenario(rec: Recommender, target: str, source: str, seed: int = 0) -> dict[str, float]:
    """Rank ``target`` from texts of ``source`` items with the categories of each user's history."""
    tgt, src = rec.catalogs[target].scenario, rec.catalogs[source].scenario
    if tgt.categories is None or src.categories is None:
        raise ValueError("cross-scenario evaluation needs item categories in both scenarios")
    by_cat: dict[str, list[int]] = {}
    for i, c in enumerate(src.categories):
        by_cat.setdefault(str(c), []).append(i)
    rng = np.random.default_rng(seed)
    split = leave_one_out(tgt)
    counts = train_counts(split, tgt.num_items)
    cross, pop, hits = [], [], []
    for i, u in enumerate(split.eval_users):
        history = np.append(split.train[u], split.valid_target[i])[-rec.cfg.model.history :]
        texts = [src.texts[rng.choice(by_cat[str(tgt.categories[j])])] for j in history]
        got = rec.recommend(Request(scenario=target, history_texts=texts, k=10))
        ranked = [rec.catalogs[target].index[str(x["item_id"])] for x in got]
        target_item = int(split.test_target[i])
        cross.append(dcg_at_10(ranked, target_item))
        hits.append(float(target_item in ranked))
        # popularity with ties in expectation: rank uniform over the tied block
        greater = int((counts > counts[target_item]).sum())
        equal = int((counts == counts[target_item]).sum())
        pop.append(float(np.mean([1 / math.log2(r + 2) if r < 10 else 0.0 for r in range(greater, greater + equal)])))
    return {
        "cross_scenario_ndcg@10": float(np.mean(cross)),
        "cross_scenario_hr@10": float(np.mean(hits)),
        "popularity_ndcg@10": float(np.mean(pop)),
        "users": len(cross),
    }


def plot(rows: list[dict[str, float]], path: Path, scenario: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    sc = ax.scatter(
        [r["ndcg@10"] for r in rows],
        [r["ndcg@10_satisfied"] for r in rows],
        c=[r["ild@10"] for r in rows],
        cmap="viridis",
        s=40,
    )
    for r in rows:
        if r["pareto"]:
            ax.scatter(r["ndcg@10"], r["ndcg@10_satisfied"], s=140, facecolors="none", edgecolors="red")
            ax.annotate(
                f"w={r['satisfaction_weight']:g}, λ={r['diversity']:g}",
                (r["ndcg@10"], r["ndcg@10_satisfied"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
    fig.colorbar(sc, label="intra-list diversity @10")
    ax.set_xlabel("NDCG@10 (engagement: the test item)")
    ax.set_ylabel("NDCG@10 over users satisfied by their test item")
    ax.set_title(f"{scenario}: satisfaction weight w x MMR λ (red: Pareto-efficient)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/latest", help="a run folder of `crossrec simulate`")
    parser.add_argument("--scenario", default="video")
    parser.add_argument("--source", default="news", help="scenario whose texts form cross-scenario histories")
    parser.add_argument("--data", default=None, help="folder of scenario folders (default: RUN/data)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/serving-eval)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "serving-eval"
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else run / "data"
    rec = Recommender(run, [data / args.scenario, data / args.source], out / "cache")
    rows = tradeoff(rec, args.scenario)
    cross = cross_scenario(rec, args.scenario, args.source)
    plot(rows, out / "tradeoff.png", args.scenario)
    (out / "serving_eval.json").write_text(json.dumps({"tradeoff": rows, "cross_scenario": cross}, indent=2) + "\n")
    print(f"{'w_sat':>6} {'lambda':>6} {'ndcg@10':>8} {'ndcg_sat':>8} {'ild@10':>7} pareto")
    for r in rows:
        print(
            f"{r['satisfaction_weight']:6.2f} {r['diversity']:6.2f} {r['ndcg@10']:8.4f} "
            f"{r['ndcg@10_satisfied']:8.4f} {r['ild@10']:7.4f} {'*' if r['pareto'] else ''}"
        )
    print(f"\ncross-scenario ({args.source} texts -> {args.scenario}): {json.dumps(cross)}")
    print(f"wrote {out / 'tradeoff.png'} and {out / 'serving_eval.json'}")


if __name__ == "__main__":
    main()
