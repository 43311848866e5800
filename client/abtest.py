"""A/B test reports that stay valid when they are read again and again: a mixture sequential probability ratio
test (mSPRT, normal mixture; Johari, Pekelis and Walsh, "Always valid inference", 2017).

The metric is the reward per impression (the sum over its shown items of the outcomes weighted as the service
weighs the objectives). With arm means a, b, their difference d = b - a and its variance V = s_a^2 / n_a +
s_b^2 / n_b, the mixture likelihood ratio against "no difference", with a N(0, tau^2) mixture over effects, is

    L = sqrt(V / (V + tau^2)) x exp(tau^2 d^2 / (2 V (V + tau^2)))

and "B differs from A" is declared once L >= 1 / alpha: the chance of ever declaring it under no difference
stays <= alpha however often the report is read. The always-valid (1 - alpha) interval is

    d +- sqrt(V (V + tau^2) / tau^2 x (log((V + tau^2) / V) + 2 log(1 / alpha))).

tau is set to the minimum detectable effect (the mixture puts its weight on the effects one plans for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Verdict:
    difference: float  # mean of B minus mean of A
    low: float  # always-valid interval
    high: float
    likelihood_ratio: float
    significant: bool  # likelihood ratio >= 1 / alpha


def msprt(a: np.ndarray, b: np.ndarray, tau: float, alpha: float = 0.05) -> Verdict:
    """The mSPRT verdict on B - A from the per-impression rewards of each arm (each needs 2+ impressions)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"each arm needs at least 2 impressions, got A {len(a)} and B {len(b)}")
    if not tau > 0 or not 0 < alpha < 1:
        raise ValueError(f"need tau > 0 and alpha in (0, 1), got tau {tau} and alpha {alpha}")
    difference = float(b.mean() - a.mean())
    variance = float(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    if variance <= 0:  # both arms constant: no evidence either way beyond the means
        return Verdict(difference, difference, difference, 1.0, False)
    t2 = tau * tau
    log_ratio = 0.5 * math.log(variance / (variance + t2)) + t2 * difference**2 / (2 * variance * (variance + t2))
    half = math.sqrt(variance * (variance + t2) / t2 * (math.log((variance + t2) / variance) + 2 * math.log(1 / alpha)))
    return Verdict(
        difference, difference - half, difference + half, math.exp(min(log_ratio, 700.0)), log_ratio >= -math.log(alpha)
    )


def planned_size(variance: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Impressions per arm at which the mSPRT (tau = mde) declares a true difference of ``mde`` with probability
    >= ``power`` at that look, ``variance`` being the sum of the two arms' per-impression variances: the least n
    with P(|d| >= half-width(n)) >= power, d ~ N(mde, variance / n). (Reading the report earlier as well only
    adds chances to detect it.)"""
    if not variance > 0 or not mde > 0:
        raise ValueError(f"need a positive variance and minimum detectable effect, got {variance} and {mde}")
    z = NormalDist().inv_cdf(power)

    def enough(n: int) -> bool:
        v = variance / n
        half = math.sqrt(v * (v + mde**2) / mde**2 * (math.log((v + mde**2) / v) + 2 * math.log(1 / alpha)))
        return mde - half >= z * math.sqrt(v)

    high = 2
    while not enough(high):
        high *= 2
    low = high // 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


@dataclass(frozen=True)
class Report:
    impressions: dict[str, int]  # arm -> impressions with feedback
    means: dict[str, float]  # arm -> reward per impression
    verdict: Verdict  # B - A
    alpha: float
    mde: float
    planned_per_arm: int | None  # impressions per arm to detect mde with the power asked (None: no variance yet)

    def lines(self) -> list[str]:
        out = [
            f"arm {a}: {self.impressions[a]} impressions, reward per impression {self.means[a]:.4f}" for a in self.means
        ]
        v = self.verdict
        out.append(
            f"B - A: {v.difference:+.4f}, always-valid {1 - self.alpha:.0%} interval [{v.low:+.4f}, {v.high:+.4f}]: "
            f"{'B differs from A' if v.significant else 'no difference declared'}; planned "
            f"{self.planned_per_arm} impressions per arm to detect {self.mde:g}"
        )
        return out


def report(arms: dict[str, np.ndarray], mde: float, alpha: float = 0.05, power: float = 0.8) -> Report:
    """Per arm: impressions and mean reward per impression; B - A with its mSPRT verdict; the impressions per
    arm planned for detecting ``mde`` (from the arms' observed variances)."""
    missing = sorted({"A", "B"} - set(arms))
    if missing:
        raise ValueError(f"no feedback from arm {' or '.join(missing)} yet (arms with feedback: {sorted(arms)})")
    a, b = arms["A"], arms["B"]
    verdict = msprt(a, b, mde, alpha)  # refuses an arm with fewer than 2 impressions
    variance = float(a.var(ddof=1) + b.var(ddof=1))
    return Report(
        impressions={name: len(v) for name, v in sorted(arms.items())},
        means={name: float(v.mean()) for name, v in sorted(arms.items())},
        verdict=verdict,
        alpha=alpha,
        mde=mde,
        planned_per_arm=planned_size(variance, mde, alpha, power) if variance > 0 else None,
    )
