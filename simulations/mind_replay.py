"""Off-policy evaluation of the exploration policies on logged news impressions (MIND: each impression logged
every candidate it showed, with a click label each).

Impressions are taken in time order. For each, a policy picks one candidate (``client.serving.make_list`` with
one slot, the model's expected click probability as the prior, the candidates' feedback so far) and learns the
click of what it picked. Three estimates of each policy's click-through rate, each with a 95 % interval:

- ``direct``: the logged click of the candidate it picked, on every impression (MIND logged all candidates, so
  this is the policy's own click-through rate on these impressions);
- ``replay`` (Li et al., WSDM 2011): a uniformly random candidate is drawn as the logged one (the same draws for
  every policy); only impressions where the policy picks it count, and only those teach the policy;
- ``ips``: inverse propensity scoring over the same draws: mean of 1[pick = logged] x click x candidates.

    python -m simulations.mind_replay --checkpoint RUN --data RUN/data/news [--splits valid,test] [--seeds 0,1,2,3,4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from client.bandit import ItemStats
from client.serving import Recommender, Request, make_list
from shared.config import POLICIES
from shared.data import impression_positions

from .serving_cli import serve_config

logger = logging.getLogger(__name__)


@torch.no_grad()
def candidate_priors(rec: Recommender, scenario: str, positions: np.ndarray) -> list[torch.Tensor]:
    """The model's expected click probability of each impression's candidates, from the user's log before it."""
    catalog = rec.catalogs[scenario]
    log = catalog.scenario.impressions
    assert log is not None
    weights = rec._weights(Request(scenario=scenario))
    out = []
    for m in tqdm(positions, desc="scoring impressions", leave=False):
        history = catalog.scenario.sequences[log.users[m]][: log.history_lengths[m]]
        user = catalog.model.user_from_vectors(catalog.table[torch.from_numpy(history[-rec.cfg.model.history :])])
        out.append(rec.scored(catalog, user, weights, torch.from_numpy(log.candidates[m]), history)[2])
    return out


def interval(values: np.ndarray) -> tuple[float, float, float]:
    mean = float(values.mean())
    half = 1.96 * float(values.std(ddof=1)) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run folder or checkpoint whose model serves news")
    parser.add_argument("--data", required=True, help="the news scenario folder (with impressions.jsonl)")
    parser.add_argument("--splits", default="valid,test", help="impressions held out of training: valid, test")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the random logging draws and the policies")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--run-config", default="", help='serve.* overrides, e.g. "serve.prior-strength=4"')
    parser.add_argument("--out", default="runs/mind-replay")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve = dataclasses.replace(serve_config(args.run_config).serve, explore_slots=1)
    rec = Recommender(args.checkpoint, [args.data], Path(args.out) / "cache", serve=serve)
    name, catalog = next(iter(rec.catalogs.items()))
    log = catalog.scenario.impressions
    if log is None:
        raise ValueError(f"{args.data}: scenario '{name}' has no impressions.jsonl")
    positions = np.concatenate([impression_positions(log.impression_ids, s) for s in args.splits.split(",")])
    positions = positions[log.history_lengths[positions] > 0]
    positions = positions[np.argsort(log.timestamps[positions], kind="stable")]
    priors = candidate_priors(rec, name, positions)
    vectors = catalog.table[:, : catalog.model.head.dim]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict[str, object]] = {}
    per_impression: dict[str, dict[str, np.ndarray]] = {}
    for policy in args.policies.split(","):
        direct, ips = np.zeros((len(seeds), len(positions))), np.zeros((len(seeds), len(positions)))
        replay: list[float] = []
        for s, seed in enumerate(seeds):
            logged_rng, policy_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1_000_003)
            learned = ItemStats.none(catalog.scenario.num_items)  # what the policy learns from its own picks
            replayed = ItemStats.none(catalog.scenario.num_items)  # what it learns from the matched impressions
            for j, (m, prior) in enumerate(zip(positions, priors, strict=True)):
                rows, clicks = log.candidates[m], log.clicks[m]
                logged = int(logged_rng.integers(len(rows)))  # the simulated uniform logging policy's pick
                candidates = vectors[torch.from_numpy(rows)]
                pick = make_list(prior, prior, learned.take(rows), candidates, 1, 0.0, serve, policy, policy_rng).rows[
                    0
                ]
                direct[s, j] = clicks[pick]
                learned.add(int(rows[pick]), float(clicks[pick]), float(prior[pick]))
                pick = make_list(prior, prior, replayed.take(rows), candidates, 1, 0.0, serve, policy, policy_rng).rows[
                    0
                ]
                ips[s, j] = float(pick == logged) * clicks[logged] * len(rows)
                if pick == logged:
                    replay.append(float(clicks[pick]))
                    replayed.add(int(rows[pick]), float(clicks[pick]), float(prior[pick]))
        per_impression[policy] = {"direct": direct.mean(axis=0), "ips": ips.mean(axis=0)}  # seeds averaged
        results[policy] = {
            "direct": interval(direct.mean(axis=0)),
            "replay": interval(np.asarray(replay)),
            "replay_matches": len(replay),
            "ips": interval(ips.mean(axis=0)),
        }
        if "greedy" in per_impression and policy != "greedy":  # paired over impressions
            for kind in ("direct", "ips"):
                results[policy][f"{kind}_minus_greedy"] = interval(
                    per_impression[policy][kind] - per_impression["greedy"][kind]
                )
    impressions = len(positions)
    print(
        f"{impressions} impressions ({args.splits}), {len(seeds)} seeds; click-through rate of the pick [95% interval]"
    )
    print(f"{'policy':<15} {'direct':>24} {'direct - greedy':>26} {'replay':>24} {'ips':>24}")
    for policy, row in results.items():
        cells = [row.get(k, (np.nan,) * 3) for k in ("direct", "direct_minus_greedy", "replay", "ips")]
        print(f"{policy:<15} " + " ".join(f"{c[0]:+.4f} [{c[1]:+.4f}, {c[2]:+.4f}]".rjust(26) for c in cells))  # type: ignore[index]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"impressions": impressions, "splits": args.splits, "seeds": seeds, "policies": results}
    (out / "replay.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'replay.json'}")


if __name__ == "__main__":
    main()
