"""Feedback, exploration policies and A/B assignment: the store, the bandit by hand, and a real service."""

import math
import os
import signal
import sqlite3
import threading
import time
import uuid

import httpx
import numpy as np
import pytest

from client.bandit import ItemStats, corrected, explore, posterior
from client.feedback import Event, FeedbackConflict, FeedbackStore, Outcome, Shown, ingest
from client.service import arm_of
from shared.config import POLICIES
from simulations.serving_cli import service_process

WEIGHTS = {"engagement": 0.5, "satisfaction": 0.5}


def event(request_id, shown, outcomes=(), user="u1"):
    return Event(
        request_id=request_id,
        scenario="video",
        user_id=user,
        served=1_700_000_000.0,
        shown=tuple(Shown(item, pos, 1.0, expected) for pos, (item, expected) in enumerate(shown)),
        outcomes=tuple(Outcome(item, objective, value, 1_700_000_060.0) for item, objective, value in outcomes),
    )


def test_posterior_matches_a_hand_computation_and_survives_a_restart(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    events = [
        event("r1", [("a", 0.2), ("b", 0.1)], [("a", "engagement", 1.0), ("a", "satisfaction", 1.0)]),
        event("r2", [("a", 0.4)], [("a", "engagement", 1.0)]),
        event("r3", [("c", 0.3), ("b", 0.05)], [("b", "satisfaction", 0.6)]),
    ]
    assert store.record(events, WEIGHTS) == [True, True, True]
    store.close()
    store = FeedbackStore(tmp_path / "feedback.sqlite")  # a restarted service reads the same state
    stats = store.item_stats("video", ["a", "b", "c", "never"])
    # a: shown 2x, reward 0.5 + 0.5 (r1) + 0.5 (r2) = 1.5, expected 0.2 + 0.4; b: reward 0.5 x 0.6 = 0.3
    np.testing.assert_allclose(stats.shown, [2, 2, 1, 0])
    np.testing.assert_allclose(stats.reward, [1.5, 0.3, 0.0, 0.0])
    np.testing.assert_allclose(stats.expected, [0.6, 0.15, 0.3, 0.0])
    assert (stats.total_reward, stats.total_expected) == pytest.approx((1.8, 1.05))
    # calibration c = (1.8 + 2) / (1.05 + 2) = 1.245902; shape = 2c + R, rate = 2 + E
    shape, rate = posterior(stats, strength=2.0)
    np.testing.assert_allclose(shape, [3.991803, 2.791803, 2.491803, 2.491803], atol=1e-6)
    np.testing.assert_allclose(rate, [2.6, 2.15, 2.3, 2.0])
    p = np.array([0.3, 0.3, 0.3, 0.3])
    np.testing.assert_allclose(corrected(p, stats, 2.0), [0.460593, 0.389554, 0.325018, 0.373770], atol=1e-6)
    # UCB by hand: p x (mean + sqrt(2 ln(1 + 1.05) / rate)) = a 0.683520, b 0.634703, c 0.562039, never 0.627947
    picked, chance = explore(
        "ucb", p, stats, 2, np.random.default_rng(0), strength=2.0, epsilon=0.0, ucb_c=1.0, draws=1
    )
    assert picked.tolist() == [0, 1] and chance.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert store.version == 1


def test_duplicates_are_stored_once_and_conflicts_store_nothing(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    first = event("r1", [("a", 0.2)], [("a", "engagement", 1.0)])
    assert store.record([first], WEIGHTS) == [True]
    assert store.record([first, event("r2", [("b", 0.1)])], WEIGHTS) == [False, True]  # a retried batch
    changed = event("r1", [("a", 0.2)], [("a", "engagement", 0.0)])
    with pytest.raises(FeedbackConflict, match="'r1' is already stored with other content"):
        store.record([event("r3", [("c", 0.1)]), changed], WEIGHTS)
    with pytest.raises(FeedbackConflict, match="repeats within the batch"):
        store.record([event("r4", [("c", 0.1)]), event("r4", [("c", 0.1)])], WEIGHTS)
    stats = store.item_stats("video", ["a", "b", "c"])
    np.testing.assert_allclose(stats.shown, [1, 1, 0])  # r3 and r4 rolled back with their batch
    np.testing.assert_allclose(stats.reward, [0.5, 0.0, 0.0])


def test_ingest_turns_engagements_into_canonical_interactions_exactly_once(tmp_path):
    from shared.data import DataError, load_scenario
    from shared.demo import write_demo_federation

    write_demo_federation(tmp_path / "data")
    folder = tmp_path / "data" / "video"
    before = load_scenario(folder)
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    store.record(
        [
            event(
                "r1",
                [("video-0005", 0.2), ("video-0006", 0.1)],
                [("video-0006", "engagement", 1.0)],
                user="video-user-0002",
            ),
            event(
                "r2",
                [("video-0007", 0.3)],
                [("video-0007", "engagement", 1.0), ("video-0007", "satisfaction", 0.8)],
                user="new-user",
            ),
            event("r3", [("video-0008", 0.3)], [("video-0008", "satisfaction", 1.0)], user="new-user"),  # no click
        ],
        WEIGHTS,
    )
    assert ingest(store, folder) == (2, 0)
    after = load_scenario(folder)
    assert after.num_interactions == before.num_interactions + 2
    new = after.users.index("new-user")
    assert [after.item_ids[i] for i in after.sequences[new]] == ["video-0007"]
    assert after.labels["satisfaction"][new].tolist() == [1.0]
    old = after.users.index("video-user-0002")
    assert after.item_ids[after.sequences[old][-1]] == "video-0006"  # its time 1_700_000_060 is the latest
    assert ingest(store, folder) == (0, 2)  # again: nothing twice
    store.record([event("r4", [("video-0009", 0.3)], [("video-0009", "engagement", 1.0)], user="new-user")], WEIGHTS)
    assert ingest(store, folder) == (1, 2)
    text = (folder / "interactions.jsonl").read_bytes()
    other = tmp_path / "data" / "shop"
    ghost = Event("r5", "shop", "u", 1.0, (Shown("ghost", 0, 1.0, 0.1),), (Outcome("ghost", "engagement", 1.0, 2.0),))
    store.record([ghost], {"engagement": 1.0})
    with pytest.raises(DataError, match="item 'ghost', which is not in"):
        ingest(store, other)
    assert (folder / "interactions.jsonl").read_bytes() == text
    assert load_scenario(other).num_interactions == load_scenario(tmp_path / "data" / "shop").num_interactions


def test_the_store_refuses_files_that_are_not_its_own(tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE orders (id INTEGER)")
    with pytest.raises(ValueError, match="another application's tables"):
        FeedbackStore(other)
    with sqlite3.connect(other) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("orders",)]  # untouched
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="not a crossrec feedback database"):
        FeedbackStore(garbage)
    with pytest.raises(ValueError, match="is a folder"):
        FeedbackStore(tmp_path)
    newer = tmp_path / "newer.sqlite"
    FeedbackStore(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(ValueError, match="schema version 99 is newer"):
        FeedbackStore(newer)


@pytest.mark.parametrize("policy", POLICIES)
def test_propensities_sum_to_the_slots_and_are_the_chance_of_being_listed(policy):
    """Each candidate's propensity is its frequency in the lists the policy makes (4,000 lists, fresh randomness
    each); the propensities of all candidates sum to the number of exploration slots."""
    rng = np.random.default_rng(7)
    size, slots = 12, 3
    p = np.sort(rng.uniform(0.05, 0.5, size))[::-1]
    stats = ItemStats(
        rng.integers(0, 30, size).astype(float), rng.uniform(0, 3, size), rng.uniform(1, 6, size), 12.0, 40.0
    )
    settings = {"strength": 2.0, "epsilon": 0.3, "ucb_c": 1.0, "draws": 2000}
    counts = np.zeros(size)
    for seed in range(4000):
        picked, chance = explore(policy, p, stats, slots, np.random.default_rng(seed), **settings)
        assert len(set(picked.tolist())) == slots
        assert chance.sum() == pytest.approx(slots)
        assert np.all(chance[picked] > 0)
        counts[picked] += 1
    np.testing.assert_allclose(counts / 4000, chance, atol=0.04)
    if policy == "epsilon-greedy":  # exact: epsilon x slots / size + (1 - epsilon) x [among the best means]
        best = np.argsort(-corrected(p, stats, 2.0))[:slots]
        expected = np.full(size, 0.3 * slots / size)
        expected[best] += 0.7
        np.testing.assert_allclose(chance, expected)


def test_ab_assignment_is_stable_and_splits_at_the_share():
    users = [f"user-{n}" for n in range(20_000)]
    arms = [arm_of(u, 0.3) for u in users]
    assert arms == [arm_of(u, 0.3) for u in users]  # stable
    assert sum(a == "B" for a in arms) / len(users) == pytest.approx(0.3, abs=0.015)
    assert {arm_of(u, 0.0) for u in users[:100]} == {"A"} and arm_of(None, 0.9) == "A"
    # a larger share keeps every user already in B there (growing an experiment moves nobody back)
    assert all(arm_of(u, 0.5) == "B" for u, a in zip(users, arms, strict=True) if a == "B")


@pytest.fixture(scope="module")
def served(tmp_path_factory, service_cfg, demo_dir, random_checkpoint):
    cfg = service_cfg
    root = tmp_path_factory.mktemp("feedback")
    checkpoint, other = random_checkpoint(cfg, root / "a", 1), random_checkpoint(cfg, root / "b", 2)
    db = root / "feedback.sqlite"
    settings = f"serve.feedback-db={db} serve.policy=thompson serve.ab-share=0.5 serve.ab-policy=greedy"
    with service_process(
        checkpoint, [demo_dir / "video"], root / "cache", 120, run_config=settings, ab_checkpoint=other
    ) as (proc, url):
        yield {"url": url, "db": db, "proc": proc, "root": root, "checkpoint": checkpoint, "data": demo_dir / "video"}


def feedback_body(response, clicks=1, user="video-user-0001"):
    items, now = response["items"], time.time()
    return {
        "request_id": response["request_id"],
        "scenario": "video",
        "user_id": user,
        "served": now,
        "policy": response["policy"],
        "arm": response["arm"],
        "checkpoint": response["checkpoint"],
        "shown": [
            {"item_id": i["item_id"], "position": n, "propensity": i["propensity"], "expected": i["expected"],
             "explored": i["explored"]}
            for n, i in enumerate(items)
        ],  # fmt: skip
        "outcomes": [
            {"item_id": i["item_id"], "objective": "engagement", "value": 1, "time": now} for i in items[:clicks]
        ],
    }  # fmt: skip


def count(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM impressions").fetchone()[0]


@pytest.mark.serving
def test_recommend_explore_and_record_feedback(served):
    users = {"A": None, "B": None}
    for n in range(40):
        users[arm_of(f"video-user-{n:04d}", 0.5)] = users[arm_of(f"video-user-{n:04d}", 0.5)] or f"video-user-{n:04d}"
    a = httpx.post(served["url"] + "/recommend", json={"scenario": "video", "user_id": users["A"], "k": 10}).json()
    b = httpx.post(served["url"] + "/recommend", json={"scenario": "video", "user_id": users["B"], "k": 10}).json()
    assert (a["arm"], a["policy"], b["arm"], b["policy"]) == ("A", "thompson", "B", "greedy")
    assert a["checkpoint"] != b["checkpoint"]  # arm B is served by --ab-checkpoint
    again = httpx.post(served["url"] + "/recommend", json={"scenario": "video", "user_id": users["B"]}).json()
    assert (again["arm"], again["checkpoint"]) == ("B", b["checkpoint"])  # a user stays in its arm
    assert [i["explored"] for i in a["items"]] == [False] * 8 + [True] * 2  # serve.explore-slots = 2
    assert all(i["propensity"] == 1.0 for i in a["items"][:8]) and all(0 < i["propensity"] <= 1 for i in a["items"])
    assert not any(i["explored"] for i in b["items"])

    before = count(served["db"])
    body = feedback_body(a, user=users["A"])
    stored = httpx.post(served["url"] + "/feedback", json={"events": [body]})
    assert stored.status_code == 200 and stored.json() == {"stored": 1, "duplicates": 0}
    again = httpx.post(served["url"] + "/feedback", json={"events": [body]})  # a retry after a lost answer
    assert again.json() == {"stored": 0, "duplicates": 1}
    changed = dict(body, outcomes=[])
    assert httpx.post(served["url"] + "/feedback", json={"events": [changed]}).status_code == 409
    assert count(served["db"]) == before + 1


@pytest.mark.serving
@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"scenario": "books"}, 400, "events[1].scenario: unknown scenario 'books'"),
        ({"shown": [{"item_id": "nope", "position": 0, "propensity": 1, "expected": 0.1}]}, 400, "unknown item ids"),
        ({"outcomes": [{"item_id": "video-0239", "objective": "engagement", "value": 1, "time": 1}]}, 400, "not shown"),
        ({"outcomes": [{"item_id": "ITEM", "objective": "likes", "value": 1, "time": 1}]}, 400, "not one of"),
        ({"outcomes": [{"item_id": "ITEM", "objective": "engagement", "value": 2, "time": 1}]}, 422, "value"),
        ({"shown": []}, 422, "shown"),
        ({"served": "yesterday"}, 422, "served"),
        ({"propensity": 0}, 422, "propensity"),
        ({"colour": "red"}, 422, "colour"),
    ],
)
def test_bad_feedback_gets_4xx_and_stores_nothing_of_its_batch(served, change, status, message):
    rec = httpx.post(served["url"] + "/recommend", json={"scenario": "video", "history": ["video-0001"], "k": 3})
    good = feedback_body(rec.json())
    bad = feedback_body(rec.json())
    bad["request_id"] = uuid.uuid4().hex
    shown_item = bad["shown"][0]["item_id"]
    if "propensity" in change:
        bad["shown"][0]["propensity"] = change["propensity"]
    else:
        bad.update(change)
    for outcome in bad["outcomes"]:
        outcome["item_id"] = outcome["item_id"].replace("ITEM", shown_item)
    before = count(served["db"])
    response = httpx.post(served["url"] + "/feedback", json={"events": [good, bad]})
    assert response.status_code == status, response.text
    assert message in response.text
    assert count(served["db"]) == before  # the good event of the batch is not stored either


@pytest.mark.serving
def test_feedback_acknowledged_before_a_sigkill_is_never_lost(tmp_path, served):
    """A real service killed with SIGKILL in the middle of a burst of feedback from four clients: every event
    it acknowledged is in the database when it is opened again."""
    db = tmp_path / "burst.sqlite"
    acknowledged, stop = [], threading.Event()

    def client(url):
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                body = {
                    "request_id": uuid.uuid4().hex, "scenario": "video", "user_id": "video-user-0003", "served": 1.0,
                    "shown": [{"item_id": "video-0001", "position": 0, "propensity": 1, "expected": 0.2}],
                    "outcomes": [{"item_id": "video-0001", "objective": "engagement", "value": 1, "time": 2.0}],
                }  # fmt: skip
                try:
                    response = http.post(url + "/feedback", json={"events": [body]})
                except httpx.HTTPError:
                    return  # the service is gone
                if response.status_code == 200:
                    acknowledged.append(body["request_id"])

    settings = f"serve.feedback-db={db}"
    with service_process(
        served["checkpoint"], [served["data"]], served["root"] / "cache", 120, run_config=settings
    ) as (
        proc,
        url,
    ):
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join()
    assert len(acknowledged) >= 200
    with sqlite3.connect(db) as conn:
        stored = {r[0] for r in conn.execute("SELECT request_id FROM impressions")}
        shown = conn.execute("SELECT shown FROM item_stats WHERE item_id = 'video-0001'").fetchone()[0]
    assert set(acknowledged) <= stored
    assert shown == len(stored) and math.isfinite(shown)  # the running totals match the stored events


def test_msprt_by_hand():
    from client.abtest import msprt

    # a: mean 0.5, variance 1/3; b: mean 0.75, variance 1/4; V = 1/12 + 1/16 = 0.1458333; tau^2 = 0.25
    # L = sqrt(V / (V + 0.25)) exp(0.25 x 0.0625 / (2 V (V + 0.25))) = 0.606977 x 1.144924 = 0.694943
    # half-width = sqrt(V (V + 0.25) / 0.25 x (ln((V + 0.25) / V) + 2 ln 20)) = sqrt(0.2309028 x 6.989994) = 1.270437
    v = msprt(np.array([0, 1, 0, 1.0]), np.array([1, 1, 0, 1.0]), tau=0.5, alpha=0.05)
    assert v.difference == 0.25 and v.likelihood_ratio == pytest.approx(0.694943, abs=1e-5)
    assert (v.low, v.high) == pytest.approx((0.25 - 1.270437, 0.25 + 1.270437), abs=1e-5)
    assert not v.significant
    with pytest.raises(ValueError, match="at least 2 impressions"):
        msprt(np.array([1.0]), np.array([0.0, 1.0]), tau=0.1)


def test_msprt_false_positive_rate_when_the_report_is_read_after_every_100_events():
    """No difference (click rate 0.1 in both arms), 2,000 events, the report read after every 100: the share of
    400 experiments in which B is ever declared different stays <= alpha = 0.05."""
    from client.abtest import msprt, planned_size

    rng = np.random.default_rng(2026)
    declared = 0
    for _ in range(400):
        clicks = (rng.random((2, 1000)) < 0.1).astype(float)
        declared += any(msprt(clicks[0, :m], clicks[1, :m], tau=0.03).significant for m in range(50, 1001, 50))
    assert declared / 400 <= 0.05
    assert planned_size(0.18, 0.02) > planned_size(0.18, 0.04) > 0  # a smaller effect needs more impressions
