"""Exploration when combining results: which candidates fill a list's exploration slots.

The model gives every candidate an expected reward ``p`` (client.serving.Recommender.scored: its share of the
user's next engagement times the expected reward of an engagement). Feedback
tells, per item, how much reward it earned (``R``) against how much the model expected when it was shown
(``E``, the sum of its ``p`` at those impressions). Each item has a multiplicative correction ``rho`` of the
model's expectation: reward ~ Poisson(p x rho), rho ~ Gamma(s c, s) a priori, whose mean c = (R_all + s) /
(E_all + s) is the model's calibration over every item of the scenario so far (empirical Bayes: an item never
shown is expected to do as well as the model's average item does, not as well as the model says; with a
model that overrates everything, a prior mean of 1 would send every list to the items not yet shown;
``s`` = serve.prior-strength pseudo-units of expected reward). The posterior is Gamma(s c + R, s + E):
conjugate, one line to compute by hand, personalised (it scales each user's own ``p``).

Policies (``serve.policy``), each returning the picked candidates and every candidate's propensity (the
probability that it fills one of the slots, so the propensities of all candidates sum to the slot count):

- ``greedy``: the model's own order (today's top-k); ignores feedback.
- ``epsilon-greedy``: with probability epsilon the slots go to a uniformly random subset of the pool, else
  to the best posterior means.
- ``ucb``: posterior mean plus ``ucb_c x sqrt(2 ln(1 + T) / (s + E))``, T = expected reward of all the
  scenario's impressions so far; deterministic.
- ``thompson``: one draw of rho per candidate; the best draws fill the slots; propensities from
  ``draws`` further draws (Monte Carlo, their sum is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.config import POLICIES


@dataclass
class ItemStats:
    """Feedback on the candidates, aligned with them: times shown, reward earned, reward the model expected."""

    shown: np.ndarray  # (P,)
    reward: np.ndarray  # (P,)
    expected: np.ndarray  # (P,)
    total_reward: float  # over every item shown in the scenario
    total_expected: float  # over every item shown in the scenario (also UCB's clock)

    @classmethod
    def none(cls, size: int) -> ItemStats:
        return cls(np.zeros(size), np.zeros(size), np.zeros(size), 0.0, 0.0)

    def take(self, rows: np.ndarray) -> ItemStats:
        """The stats of the candidates at ``rows``."""
        return ItemStats(
            self.shown[rows], self.reward[rows], self.expected[rows], self.total_reward, self.total_expected
        )

    def add(self, row: int, reward: float, expected: float) -> None:
        """One more impression of the item at ``row``."""
        self.shown[row] += 1
        self.reward[row] += reward
        self.expected[row] += expected
        self.total_reward += reward
        self.total_expected += expected


def posterior(stats: ItemStats, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Gamma(shape, rate) of each candidate's correction rho: (s c + R, s + E), c = (R_all + s) / (E_all + s)."""
    calibration = (stats.total_reward + strength) / (stats.total_expected + strength)
    return strength * calibration + stats.reward, strength + stats.expected


def corrected(p: np.ndarray, stats: ItemStats, strength: float) -> np.ndarray:
    """Each candidate's expected reward under the posterior mean of its correction: p x (s + R) / (s + E)."""
    shape, rate = posterior(stats, strength)
    return p * shape / rate


def explore(
    policy: str,
    p: np.ndarray,
    stats: ItemStats,
    slots: int,
    rng: np.random.Generator,
    *,
    strength: float,
    epsilon: float,
    ucb_c: float,
    draws: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the candidates that fill ``slots`` slots, best first; propensity of every candidate).

    ``p``: the model's expected reward of each candidate (P,), in the model's order (best first)."""
    size = len(p)
    slots = min(slots, size)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if slots <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(size)

    def best(values: np.ndarray) -> np.ndarray:
        return np.argsort(-values, kind="stable")[:slots]  # ties: the model's order

    def indicator(rows: np.ndarray) -> np.ndarray:
        out = np.zeros(size)
        out[rows] = 1.0
        return out

    if policy == "greedy":
        picked = best(p)
        return picked, indicator(picked)
    mean = corrected(p, stats, strength)
    if policy == "epsilon-greedy":
        exploit = best(mean)
        propensity = epsilon * slots / size + (1.0 - epsilon) * indicator(exploit)
        if rng.random() < epsilon:
            return rng.choice(size, size=slots, replace=False), propensity
        return exploit, propensity
    shape, rate = posterior(stats, strength)
    if policy == "ucb":
        bonus = ucb_c * np.sqrt(2.0 * np.log1p(stats.total_expected) / rate)
        picked = best(p * (shape / rate + bonus))
        return picked, indicator(picked)
    samples = rng.gamma(shape, 1.0 / rate, size=(draws + 1, size)) * p  # (D + 1, P); row 0 decides
    order = np.argsort(-samples, axis=1, kind="stable")[:, :slots]
    counts = np.bincount(order.ravel(), minlength=size)
    return order[0], counts / (draws + 1)
