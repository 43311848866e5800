"""Deterministic demo federation: three scenarios (shop, video, news) over shared latent topics.

Item texts are real words drawn from twelve topics. Each scenario has its own catalog and its own
users; what the scenarios share is how people behave towards content:

- *Word appeal.* Every topic word has one appeal, the same in every scenario (people who like
  football like "derby" stories, "derby" videos and "derby" merchandise alike). Within a topic an
  item is chosen in proportion to the product of its words' appeal, so popularity can be read from
  the text, and every scenario's data is evidence about the same word appeals. A scenario alone
  sees about 1,000 training targets (some 17 per word); the federation sees three times as many.
  This is the knowledge federation transfers: with per-item popularity noise instead, pooling all
  data did not beat training each scenario alone (measured; see the closing note of the issue).
- *Recency.* The next item stays in the last item's topic with probability ``STAY_PROBABILITY``,
  otherwise it comes from one of the three topics of the user's persona (six personas, shared by
  all scenarios).

Shop and video log a satisfaction label (driven by quality words in the text); news has clicks only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Scenario, occupied, write_scenario

TOPICS: dict[str, list[str]] = {
    "outdoors": "hiking camping tent trail mountain backpack canoe forest compass lantern summit "
    "campfire sleeping-bag kayak wilderness".split(),
    "cooking": "recipe kitchen baking bread pasta spices chef oven soup garlic skillet dough "
    "sauce dessert grill".split(),
    "music": "guitar concert piano album jazz drums melody orchestra violin singer chorus "
    "vinyl rhythm band symphony".split(),
    "football": "football stadium league goalkeeper striker referee tournament coach penalty "
    "jersey midfielder derby transfer kickoff trophy".split(),
    "computing": "laptop processor software keyboard monitor programming server database "
    "algorithm compiler motherboard graphics memory network cloud".split(),
    "finance": "stocks investment savings mortgage dividend portfolio budget pension "
    "inflation banking interest retirement tax bonds wallet".split(),
    "fitness": "workout yoga running dumbbell protein stretching cardio marathon treadmill "
    "pilates muscles gym cycling endurance squat".split(),
    "travel": "airport hotel beach passport island cruise luggage resort itinerary "
    "sightseeing boarding hostel tour destination souvenir".split(),
    "gardening": "garden seeds soil compost tomato roses shovel greenhouse lawn pruning "
    "watering hedge orchard tulips mulch".split(),
    "astronomy": "telescope planet galaxy rocket orbit comet nebula eclipse satellite "
    "asteroid cosmos observatory meteor lunar stargazing".split(),
    "pets": "puppy kitten leash aquarium veterinarian parrot hamster grooming collar "
    "birdcage terrier goldfish litter kennel paws".split(),
    "fashion": "dress jacket sneakers handbag denim scarf leather boots blouse necklace "
    "sweater tailoring runway cotton sunglasses".split(),
}
GENERIC = "new classic modern compact deluxe essential daily special weekly complete original".split()
GOOD = "excellent durable acclaimed superb reliable".split()
BAD = "flimsy mediocre disappointing faulty dull".split()


@dataclass(frozen=True)
class ScenarioSpec:
    """Shape of one demo scenario."""

    name: str
    template: str  # item text, with {words} for the topic words and {quality} for quality words
    num_items: int
    num_users: int
    labelled: bool  # logs a satisfaction label


DEMO_SCENARIOS = (
    ScenarioSpec("shop", "{generic} {quality} {words} set for sale", 240, 360, True),
    ScenarioSpec("video", "video: {quality} {generic} film about {words}", 240, 360, True),
    ScenarioSpec("news", "news story: {generic} report on {words}", 300, 360, False),
)
PERSONA_TOPICS = 3
CLICK_BASE = 0.5  # a user's chance to click the most appealing item of one of their topics (if its quality is good)
CLICK_QUALITY = (0.2, 0.85)  # relative click chance of a bad and a good item (the log's satisfaction rates)
STAY_PROBABILITY = 0.55  # chance the next item stays in the last item's topic
WORD_APPEAL_SIGMA = 0.6  # spread of the log-appeal of topic words (shared by all scenarios)


def _personas(rng: np.random.Generator) -> np.ndarray:
    """Six personas x three topics: the four triples of one random partition, two of another."""
    names = list(TOPICS)
    rows = [rng.permutation(len(names)).reshape(-1, PERSONA_TOPICS) for _ in range(2)]
    return np.concatenate(rows)[: len(names) // 2]


def _word_appeal(rng: np.random.Generator) -> dict[str, float]:
    """Log-appeal of every topic word, shared by all scenarios."""
    words = sorted({w for ws in TOPICS.values() for w in ws})
    return dict(zip(words, rng.normal(0.0, WORD_APPEAL_SIGMA, size=len(words)), strict=True))


@dataclass(frozen=True)
class DemoTruth:
    """What the generator knows of one scenario's people and items."""

    user_topics: np.ndarray  # (U, 3) topic indices of each user's persona
    item_topic: np.ndarray  # (N,)
    popularity: np.ndarray  # (N,) product of the item's words' appeal
    good: np.ndarray  # (N,) bool: quality words that satisfy

    def click_probability(self) -> np.ndarray:
        """(U, N) chance that a user clicks an item shown to them: CLICK_BASE for an item of one of their topics,
        times the square root of its appeal relative to its topic's most appealing item, times its quality
        (CLICK_QUALITY: the rates at which the log's satisfaction label is 1); 0 outside their topics."""
        best = np.zeros(self.item_topic.max() + 1)
        np.maximum.at(best, self.item_topic, self.popularity)
        item = np.sqrt(self.popularity / best[self.item_topic]) * np.where(
            self.good, CLICK_QUALITY[1], CLICK_QUALITY[0]
        )
        liked = (self.user_topics[:, :, None] == self.item_topic[None, None, :]).any(axis=1)  # (U, N)
        return CLICK_BASE * liked * item[None, :]


def _scenario(
    spec: ScenarioSpec,
    personas: np.ndarray,
    appeal: dict[str, float],
    rng: np.random.Generator,
    min_len: int,
    max_len: int,
) -> tuple[Scenario, list[np.ndarray], DemoTruth]:
    topic_names = list(TOPICS)
    item_topic = rng.integers(len(topic_names), size=spec.num_items)
    good = rng.random(spec.num_items) < 0.5
    popularity = np.empty(spec.num_items)
    texts = []
    for i in range(spec.num_items):
        words = rng.choice(TOPICS[topic_names[item_topic[i]]], size=3, replace=False)
        popularity[i] = np.exp(sum(appeal[w] for w in words))
        texts.append(
            spec.template.format(
                words=" ".join(words),
                generic=rng.choice(GENERIC),
                quality=rng.choice(GOOD if good[i] else BAD),
            )
        )
    by_topic = [np.flatnonzero(item_topic == t) for t in range(len(topic_names))]
    sequences, labels, stamps, user_topics = [], [], [], []
    for _ in range(spec.num_users):
        liked = personas[rng.integers(len(personas))]
        user_topics.append(liked)
        length = int(rng.integers(min_len, max_len + 1))
        seq: list[int] = []
        topic = int(rng.choice(liked))
        for _ in range(length):
            if seq and rng.random() >= STAY_PROBABILITY:
                topic = int(rng.choice(liked))
            pool = by_topic[topic]
            weights = popularity[pool] * (pool != (seq[-1] if seq else -1))
            seq.append(int(rng.choice(pool, p=weights / weights.sum())))
        seq_arr = np.asarray(seq, dtype=np.int64)
        sequences.append(seq_arr)
        labels.append(np.where(good[seq_arr], rng.random(length) < 0.85, rng.random(length) < 0.2).astype(np.float32))
        stamps.append(np.cumsum(rng.integers(60, 86_400, size=length)) + 1_600_000_000)
    objectives = ("engagement", "satisfaction") if spec.labelled else ("engagement",)
    scenario = Scenario(
        name=spec.name,
        objectives=objectives,
        item_ids=[f"{spec.name}-{i:04d}" for i in range(spec.num_items)],
        texts=texts,
        categories=[topic_names[t] for t in item_topic],
        users=[f"{spec.name}-user-{u:04d}" for u in range(spec.num_users)],
        sequences=sequences,
        labels={"satisfaction": labels} if spec.labelled else {},
    )
    return scenario, stamps, DemoTruth(np.asarray(user_topics), item_topic, popularity, good)


def demo_federation(seed: int = 0, min_len: int = 4, max_len: int = 8) -> dict[str, tuple[Scenario, list[np.ndarray]]]:
    """Build the three demo scenarios (with per-interaction timestamps); same seed, same data."""
    return {name: (scenario, stamps) for name, (scenario, stamps, _) in _generate(seed, min_len, max_len).items()}


def demo_truth(seed: int = 0, min_len: int = 4, max_len: int = 8) -> dict[str, tuple[Scenario, DemoTruth]]:
    """The demo scenarios of :func:`demo_federation` with what their generator knows (for interactive simulation)."""
    return {name: (scenario, truth) for name, (scenario, _, truth) in _generate(seed, min_len, max_len).items()}


def _generate(seed: int, min_len: int, max_len: int) -> dict[str, tuple[Scenario, list[np.ndarray], DemoTruth]]:
    rng = np.random.default_rng(seed)
    personas = _personas(rng)
    appeal = _word_appeal(rng)
    return {spec.name: _scenario(spec, personas, appeal, rng, min_len, max_len) for spec in DEMO_SCENARIOS}


def write_demo_federation(folder: str | os.PathLike[str], seed: int = 0, force: bool = False) -> list[str]:
    """Write the demo federation in the canonical format, one sub-folder per scenario; existing non-empty
    scenario folders are replaced only with ``force`` (all are checked before any is written)."""
    scenarios = demo_federation(seed)
    taken = [str(Path(folder) / n) for n in scenarios if occupied(Path(folder) / n)]
    if taken and not force:
        raise FileExistsError(f"{', '.join(taken)} already exist: nothing written (pass --force to replace them)")
    names = []
    for name, (scenario, stamps) in scenarios.items():
        write_scenario(Path(folder) / name, scenario, stamps, force=force)
        names.append(name)
    return names
