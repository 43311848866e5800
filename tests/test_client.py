"""The ClientApp handlers called with real Flower messages: what leaves a client."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import evaluate_global, setup, train
from server.rounds import initial_weights
from shared.config import Config
from shared.records import ARRAYS, CONFIG, INFO, METRICS, NUM_EXAMPLES, from_arrayrecord, to_arrayrecord


def context(cfg, demo_dir, partition: int, run_dir=None) -> Context:
    """A simulation client's context; ``run_dir`` (run.dir) holds its state folder (private item memory)."""
    run_config = cfg.to_flat() | {"data.dir": str(demo_dir)} | ({"run.dir": str(run_dir)} if run_dir else {})
    node: dict[str, bool | float | int | str] = {"partition-id": partition, "num-partitions": 3}
    return Context(run_id=1, node_id=partition + 1, node_config=node, state=RecordDict(), run_config=run_config)


def test_train_reply_carries_only_trainable_weights_and_metrics(tiny_cfg, demo_dir, tmp_path):
    _, weights, model = initial_weights(tiny_cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    msg = Message(
        RecordDict({ARRAYS: to_arrayrecord(weights), CONFIG: ConfigRecord({"server-round": 1})}),
        dst_node_id=2,
        message_type="train",
    )
    out = train(msg, context(tiny_cfg, demo_dir, partition=1, run_dir=tmp_path))
    assert set(out.content.keys()) == {ARRAYS, METRICS, INFO}
    sent = from_arrayrecord(out.content.array_records[ARRAYS])
    assert set(sent) == trainable and not set(sent) & frozen
    sent_values = sum(v.size for v in sent.values())
    assert sent_values == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert any(not np.array_equal(sent[k], weights[k]) for k in sent)  # it trained
    assert out.content.config_records[INFO]["scenario"] == "video"
    assert out.content.metric_records[METRICS][NUM_EXAMPLES] > 0


def test_evaluate_reply_has_full_ranking_metrics_and_no_weights(tiny_cfg, demo_dir, tmp_path):
    _, weights, _ = initial_weights(tiny_cfg)
    msg = Message(
        RecordDict({ARRAYS: to_arrayrecord(weights), CONFIG: ConfigRecord({"server-round": 1})}),
        dst_node_id=3,
        message_type="evaluate",
    )
    out = evaluate_global(msg, context(tiny_cfg, demo_dir, partition=2, run_dir=tmp_path))
    assert ARRAYS not in out.content.array_records
    metrics = out.content.metric_records[METRICS]
    for split in ("valid", "test"):
        for name in ("hr@10", "ndcg@10", "mrr"):
            assert 0.0 <= metrics[f"{split}.{name}"] <= 1.0
    assert out.content.config_records[INFO]["scenario"] == "news"


def test_node_config_picks_the_scenario_folder(tiny_cfg, demo_dir):
    from client.app import scenario_folder

    cfg = tiny_cfg
    assert scenario_folder(cfg, {"scenario": "news", "data-dir": str(demo_dir / "news")}) == demo_dir / "news"
    with_dir = Config.from_run_config(cfg.to_flat() | {"data.dir": str(demo_dir)})
    assert scenario_folder(with_dir, {"partition-id": 0, "num-partitions": 3}) == demo_dir / "shop"
    with pytest.raises(ValueError, match="partition-id 3 has no scenario"):
        scenario_folder(with_dir, {"partition-id": 3, "num-partitions": 4})
    with pytest.raises(ValueError, match="'data.dir' is empty"):
        scenario_folder(cfg, {"partition-id": 0, "num-partitions": 3})


def test_node_config_scenario_must_match_the_data(tiny_cfg, demo_dir):
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"scenario": "shop", "data-dir": str(demo_dir / "news")},
        state=RecordDict(),
        run_config=tiny_cfg.to_flat(),
    )
    with pytest.raises(ValueError, match="scenario='shop' but the data folder holds scenario 'news'"):
        setup(ctx)
