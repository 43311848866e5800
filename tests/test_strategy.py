import dataclasses

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.strategy import CrossrecFedAvg, expected_from, reply_problem
from shared.config import FedConfig
from shared.records import ARRAYS, INFO, METRICS, NUM_EXAMPLES, from_arrayrecord, to_arrayrecord

GLOBAL = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}


def reply(node: int, arrays: dict, examples: float = 10, scenario: str | None = None) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            ARRAYS: to_arrayrecord(arrays),
            METRICS: MetricRecord({"loss": 1.0 * node, NUM_EXAMPLES: examples}),
            INFO: ConfigRecord({"scenario": scenario or f"s{node}"}),
        }
    )
    return Message(content=content, reply_to=request)


def state(value: float) -> dict:
    return {"a": np.full((2, 3), value, np.float32), "b": np.arange(4, dtype=np.float32) * value}


def strategy(min_clients: int = 1, weighting: str = "examples", **fed) -> CrossrecFedAvg:
    settings = dataclasses.replace(FedConfig(), weighting=weighting, min_clients=min_clients, **fed)
    made = CrossrecFedAvg(expected_from(GLOBAL), settings)
    made.global_arrays = GLOBAL  # what configure_train keeps
    return made


def test_fedavg_of_hand_built_replies_equals_hand_computed_average():
    replies = [reply(1, state(1.0), examples=10), reply(2, state(4.0), examples=30), reply(3, state(-2.0), examples=60)]
    arrays, metrics = strategy(max_share=1.0, clip=0.0, outlier=0.0).aggregate_train(1, replies)
    avg = from_arrayrecord(arrays)
    expected = (1.0 * 10 + 4.0 * 30 - 2.0 * 60) / 100  # = -0.1
    np.testing.assert_allclose(avg["a"], np.full((2, 3), expected), rtol=1e-6)
    np.testing.assert_allclose(avg["b"], np.arange(4) * expected, rtol=1e-6)
    assert avg["a"].dtype == np.float32
    assert metrics["loss"] == pytest.approx(2.0)  # plain mean over scenarios


def test_uniform_weighting_gives_each_scenario_one_vote():
    replies = [reply(1, state(1.0), examples=10), reply(2, state(4.0), examples=30)]
    arrays, _ = strategy(weighting="uniform").aggregate_train(1, replies)
    np.testing.assert_allclose(from_arrayrecord(arrays)["a"], np.full((2, 3), 2.5))


def bad(kind: str) -> Message:
    arrays = state(1.0)
    if kind == "nan":
        arrays["a"][0, 1] = np.nan
    elif kind == "shape":
        arrays["b"] = np.zeros(5, np.float32)
    elif kind == "dtype":
        arrays["b"] = np.zeros(4, np.float64)
    elif kind == "missing":
        del arrays["b"]
    elif kind == "extra":
        arrays["frozen.weight"] = np.zeros(2, np.float32)
    elif kind == "examples":
        return reply(9, arrays, examples=0)
    elif kind == "error":
        return Message(
            Error(code=1, reason="boom"), reply_to=Message(RecordDict(), dst_node_id=9, message_type="train")
        )
    return reply(9, arrays)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nan", "'a' has non-finite values"),
        ("shape", "'b' has shape (5,), expected (4,)"),
        ("dtype", "'b' has dtype float64"),
        ("missing", "missing keys ['b']"),
        ("extra", "unexpected keys ['frozen.weight']"),
        ("examples", "'num-examples' must be positive"),
        ("error", "client error: boom"),
    ],
)
def test_bad_reply_is_dropped_with_a_reason(kind, reason):
    assert reason in reply_problem(bad(kind), expected_from(GLOBAL))
    s = strategy()
    arrays, _ = s.aggregate_train(3, [reply(1, state(1.0)), bad(kind), reply(2, state(3.0))])
    np.testing.assert_allclose(from_arrayrecord(arrays)["a"], np.full((2, 3), 2.0))  # the bad one did not count
    assert len(s.dropped) == 1 and reason in s.dropped[0] and s.dropped[0].startswith("round 3:")


def test_too_few_valid_replies_leaves_no_new_model():
    s = strategy(min_clients=2)
    arrays, metrics = s.aggregate_train(1, [reply(1, state(1.0)), bad("nan")])
    assert arrays is None and metrics is None


def test_evaluate_keeps_metrics_per_scenario():
    s = strategy()
    request = Message(RecordDict(), dst_node_id=1, message_type="evaluate")
    ok = Message(
        RecordDict(
            {METRICS: MetricRecord({"valid.ndcg@10": 0.5, NUM_EXAMPLES: 3}), INFO: ConfigRecord({"scenario": "news"})}
        ),
        reply_to=request,
    )
    nan = Message(
        RecordDict(
            {
                METRICS: MetricRecord({"valid.ndcg@10": float("nan"), NUM_EXAMPLES: 3}),
                INFO: ConfigRecord({"scenario": "shop"}),
            }
        ),
        reply_to=request,
    )
    agg = s.aggregate_evaluate(1, [ok, nan])
    assert s.eval_metrics == {"news": {"valid.ndcg@10": 0.5, NUM_EXAMPLES: 3}}
    assert agg["valid.ndcg@10"] == 0.5
