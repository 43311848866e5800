"""Error rates of ``crossrec abtest report`` (client/abtest.py) on simulated traffic with a known effect.

Each impression's reward is a click (Bernoulli). Under no effect both arms click at --rate; with an effect
arm B clicks at --rate + --mde. The report is read after every --every events (both arms together):
- power: the share of experiments with the effect in which B is declared different by the planned sample
  size (impressions per arm, from ``planned_size``), and at exactly that size;
- false positives: the share of experiments without an effect in which B is ever declared different up to
  twice the planned size, reading the report after every --every events.

    python -m simulations.abtest_sim [--rate 0.1] [--mde 0.02] [--repetitions 500] [--out runs/abtest]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from client.abtest import msprt, planned_size


def ever_declared(a: np.ndarray, b: np.ndarray, tau: float, alpha: float, every: int) -> bool:
    return any(msprt(a[:m], b[:m], tau, alpha).significant for m in range(every // 2, len(a) + 1, every // 2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=0.1, help="arm A's click rate per impression")
    parser.add_argument("--mde", type=float, default=0.02, help="the effect planned for (and given to arm B)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--power", type=float, default=0.8)
    parser.add_argument("--every", type=int, default=100, help="events between two readings of the report")
    parser.add_argument("--repetitions", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/abtest")
    args = parser.parse_args(argv)
    rate, mde = args.rate, args.mde
    planned = planned_size(rate * (1 - rate) + (rate + mde) * (1 - rate - mde), mde, args.alpha, args.power)
    rng = np.random.default_rng(args.seed)
    by_planned = at_planned = false = 0
    for _ in tqdm(range(args.repetitions), desc="experiments", leave=False):
        a = (rng.random(planned) < rate).astype(float)
        b = (rng.random(planned) < rate + mde).astype(float)
        by_planned += ever_declared(a, b, mde, args.alpha, args.every)
        at_planned += msprt(a, b, mde, args.alpha).significant
        null = (rng.random((2, 2 * planned)) < rate).astype(float)
        false += ever_declared(null[0], null[1], mde, args.alpha, args.every)
    n = args.repetitions
    result = {
        "rate": rate,
        "mde": mde,
        "alpha": args.alpha,
        "power_asked": args.power,
        "every": args.every,
        "repetitions": n,
        "planned_per_arm": planned,
        "power_by_planned": by_planned / n,
        "power_at_planned": at_planned / n,
        "false_positive_rate": false / n,
    }
    print(f"planned impressions per arm: {planned} (rate {rate:g}, effect {mde:+g}, alpha {args.alpha:g})")
    print(f"{'':<45} {'share':>7} {'95% interval':>17}")
    for label, hits in (
        (f"declared by the planned size (read every {args.every})", by_planned),
        ("declared at the planned size (one reading)", at_planned),
        (f"false positives up to 2x (read every {args.every})", false),
    ):
        p = hits / n
        half = 1.96 * np.sqrt(p * (1 - p) / n)
        print(f"{label:<45} {p:>7.3f} [{p - half:.3f}, {p + half:.3f}]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "abtest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'abtest.json'}")


if __name__ == "__main__":
    main()
