"""The ClientApp handlers called with real Flower messages: what leaves a client."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import evaluate_global, setup, train
from server.rounds import initial_weights
from shared.config import Config
from shared.records import ARRAYS, CONFIG, INFO, METRICS, NUM_EXAMPLES, from_arrayrecord, to_arrayrecord


def context(cfg, demo_dir, partition: int) -> Context:
    run_config = cfg.to_flat() | {"data.dir": str(demo_dir)}
    node = {"partition-id": partition, "num-partitions": 3}
    return Context(run_id=1, node_id=partition + 1, node_config=node, state=RecordDict(), run_config=run_config)


def test_train_reply_carries_only_trainable_weights_and_metrics(tiny_cfg, demo_dir):
    _, weights, model = initial_weights(tiny_cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    msg = Message(
        RecordDict({ARRAYS: to_arrayrecord(weights), CONFIG: ConfigRecord({"server-round": 1})}),
        dst_node_id=2,
        message_type="train",
    )
    out = train(msg, context(tiny_cfg, demo_dir, partition=1))
    assert set(out.content.keys()) == {ARRAYS, METRICS, INFO}
    sent = from_arrayrecord(out.content.array_records[ARRAYS])
    assert set(sent) == trainable and not set(sent) & frozen
    sent_values = sum(v.size for v in sent.values())
    assert sent_values == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert any(not np.array_equal(sent[k], weights[k]) for k in sent)  # it trained
    assert out.content.config_records[INFO]["scenario"] == "video"
    assert out.content.metric_records[METRICS][NUM_EXAMPLES] > 0


def test_evaluate_reply_has_full_ranking_metrics_and_no_weights(tiny_cfg, demo_dir):
    _, weights, _ = initial_weights(tiny_cfg)
    msg = Message(
        RecordDict({ARRAYS: to_arrayrecord(weights), CONFIG: ConfigRecord({"server-round": 1})}),
        dst_node_id=3,
        message_type="evaluate",
    )
    out = evaluate_global(msg, context(tiny_cfg, demo_dir, partition=2))
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


def test_in_batch_loss_ranks_each_target_against_every_fresh_item_of_the_batch(tiny_cfg, demo_dir):
    """The in-batch loss computed by hand from the model's logits; a candidate equal to the user's target
    is left out of its softmax; with per-user candidates each loss uses its own row only."""
    import torch

    from client.training import build_model, loss_fn, make_batch, prepare
    from shared.data import load_scenario

    data = prepare(load_scenario(demo_dir / "shop"), tiny_cfg)
    model = build_model(tiny_cfg, data)
    rng = np.random.default_rng(0)
    history, target, labels, negatives = make_batch(data, tiny_cfg, data.trainable_users[:4], model.num_items, rng)
    negatives[1, 0] = target[0]  # another user's target among user 1's negatives: a candidate for user 0 too
    table = model.item_table()
    with torch.no_grad():
        got, _ = loss_fn(model, history, target, labels, negatives, table, 0.0, in_batch=True)
        own, _ = loss_fn(model, history, target, labels, negatives, table, 0.0, in_batch=False)
        users = model.user_vectors(history, table)
        ids = torch.cat([target[:, None], negatives], 1)
        vectors = model.encode_items(ids).reshape(-1, users.shape[1])
        expected_in, expected_own = [], []
        for b in range(4):
            logits = model(users[b : b + 1], vectors)[0, :, 0]  # all 4 x (1 + N) items of the batch
            keep = [j for j, i in enumerate(ids.reshape(-1).tolist()) if i != int(target[b]) or j == b * ids.shape[1]]
            at = keep.index(b * ids.shape[1])
            expected_in.append(-logits[keep].log_softmax(0)[at])
            mine = [b * ids.shape[1]] + [
                b * ids.shape[1] + 1 + j for j in range(ids.shape[1] - 1) if ids[b, 1 + j] != target[b]
            ]
            expected_own.append(-logits[mine].log_softmax(0)[0])
    assert float(got) == pytest.approx(float(torch.stack(expected_in).mean()), abs=1e-5)
    assert float(own) == pytest.approx(float(torch.stack(expected_own).mean()), abs=1e-5)
    assert float(got) > float(own)  # more candidates, higher loss
