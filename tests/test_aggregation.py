"""Server-side aggregation: capped weights, bounded updates, dropped outliers, robust combiners, and
FFA-LoRA's exactness (hand-built replies; the real tiny model for the LoRA algebra)."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from peft.tuners.lora import LoraLayer

from server.strategy import CrossrecFedAvg, capped_shares, combine, expected_from
from shared.config import Config, FedConfig
from shared.model import RecModel
from shared.records import ARRAYS, INFO, METRICS, NUM_EXAMPLES, from_arrayrecord, to_arrayrecord, trainable_state

RNG = np.random.default_rng(0)
GLOBAL = {"w": RNG.normal(size=(40, 30)).astype(np.float32), "v": RNG.normal(size=200).astype(np.float32)}


def reply(node: int, arrays: dict, examples: float = 100.0) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            ARRAYS: to_arrayrecord(arrays),
            METRICS: MetricRecord({"loss": 1.0, NUM_EXAMPLES: examples}),
            INFO: ConfigRecord({"scenario": f"s{node}"}),
        }
    )
    return Message(content=content, reply_to=request)


def aggregate(replies: list[Message], sent: dict = GLOBAL, **fed) -> tuple[dict | None, CrossrecFedAvg]:
    strategy = CrossrecFedAvg(expected_from(sent), dataclasses.replace(FedConfig(), min_clients=1, **fed))
    strategy.global_arrays = sent  # what configure_train keeps
    record, _ = strategy.aggregate_train(1, replies)
    return (None if record is None else from_arrayrecord(record)), strategy


def moved(by: float, seed: int) -> dict:
    """The global weights plus an update of relative size ``by``: a direction the honest clients share plus
    half as much of the client's own (an honest client's reply)."""
    common, own = np.random.default_rng(0), np.random.default_rng(seed)
    return {
        k: (v + by * (common.normal(size=v.shape) + 0.5 * own.normal(size=v.shape)) * np.abs(v).mean()).astype(
            np.float32
        )
        for k, v in GLOBAL.items()
    }


def flat(arrays: dict) -> np.ndarray:
    return np.concatenate([arrays[k].astype(np.float64).ravel() for k in sorted(arrays)])


def test_capped_shares_are_hand_computed():
    np.testing.assert_allclose(capped_shares([10, 30, 60], 0.5), [0.125, 0.375, 0.5])
    np.testing.assert_allclose(capped_shares([10, 30, 60], 1.0), [0.1, 0.3, 0.6])
    np.testing.assert_allclose(capped_shares([1e300, 1, 1], 0.5), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(capped_shares([2**62, 2**62, 1, 3], 0.3), [0.3, 0.3, 0.1, 0.3])  # cap cascades
    np.testing.assert_allclose(capped_shares([5, 1], 0.4), [0.5, 0.5])  # no assignment meets the cap: uniform


def test_plain_fedavg_when_every_safeguard_is_off():
    replies = [reply(1, moved(0.1, 1), 10), reply(2, moved(0.1, 2), 30), reply(3, moved(0.1, 3), 60)]
    out, strategy = aggregate(replies, max_share=1.0, clip=0.0, outlier=0.0)
    expected = (0.1 * flat(moved(0.1, 1)) + 0.3 * flat(moved(0.1, 2)) + 0.6 * flat(moved(0.1, 3))).astype(np.float32)
    np.testing.assert_allclose(flat(out), expected, rtol=1e-5, atol=1e-6)
    assert [round(d["share"], 6) for d in strategy.decisions] == [0.1, 0.3, 0.6]


def test_updates_are_clipped_to_a_multiple_of_the_median_norm():
    base = {"w": np.zeros((2, 2), np.float32), "v": np.zeros(1, np.float32)}
    unit = {"w": np.array([[1, 0], [0, 0]], np.float32), "v": np.zeros(1, np.float32)}
    replies = [reply(i, {k: v * norm for k, v in unit.items()}) for i, norm in ((1, 1.0), (2, 2.0), (3, 10.0))]
    out, strategy = aggregate(replies, sent=base, outlier=0.0, clip=3.0, weighting="uniform")
    assert out["w"][0, 0] == pytest.approx((1.0 + 2.0 + 6.0) / 3)  # 10 clipped to 3 x median 2
    assert [d["clipped_to"] for d in strategy.decisions] == pytest.approx([1.0, 2.0, 6.0])


@pytest.mark.parametrize(
    ("robust", "expected"), [("median", 2.0), ("trimmed-mean", (1.0 + 2.0 + 4.0) / 3), ("mean", 107 / 5)]
)
def test_robust_combiners_are_coordinate_wise(robust, expected):
    updates = np.array([[0.0], [1.0], [2.0], [4.0], [100.0]])
    shares = np.full(5, 0.2)
    assert combine(updates, shares, robust, trim=0.2)[0] == pytest.approx(expected)


def attack(kind: str) -> Message:
    honest = moved(0.1, 3)
    if kind == "scaled x1e6":
        return reply(3, {k: v * 1e6 for k, v in honest.items()})
    if kind == "sign-flipped":
        return reply(3, {k: -v for k, v in honest.items()})
    if kind == "1e30":
        return reply(3, {k: np.full_like(v, 1e30) for k, v in honest.items()})
    rng = np.random.default_rng(7)
    random = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in honest.items()}
    if kind == "num-examples 1e300":
        return reply(3, random, examples=1e300)
    if kind == "num-examples 2**62":
        return reply(3, random, examples=2**62)
    return reply(3, random)


@pytest.mark.parametrize(
    "kind", ["scaled x1e6", "sign-flipped", "1e30", "num-examples 1e300", "num-examples 2**62", "random weights"]
)
def test_a_malicious_reply_is_dropped_by_name_and_the_aggregate_stays_honest(kind, caplog):
    honest = [reply(1, moved(0.1, 1)), reply(2, moved(0.1, 2))]
    reference, _ = aggregate(honest)
    with caplog.at_level(logging.WARNING, logger="flwr.crossrec"):
        out, strategy = aggregate([*honest, attack(kind)])
    relative = np.linalg.norm(flat(out) - flat(reference)) / np.linalg.norm(flat(reference))
    assert relative < 0.10, relative
    assert relative < 1e-6  # in fact exactly the honest aggregate: the attacker was dropped
    assert len(strategy.dropped) == 1 and "dropped reply from s3: update norm" in strategy.dropped[0]
    assert "s3" in caplog.text and "fed.outlier" in caplog.text


def test_an_inflated_example_count_buys_at_most_the_capped_share():
    """A reply that looks honest (update of the usual size) but claims 1e300 examples: its share is
    fed.max-share, not 1."""
    replies = [reply(1, moved(0.1, 1)), reply(2, moved(0.1, 2)), reply(3, moved(0.1, 3), examples=1e300)]
    out, strategy = aggregate(replies)
    assert [d["share"] for d in strategy.decisions] == pytest.approx([0.25, 0.25, 0.5])
    update = 0.25 * flat(moved(0.1, 1)) + 0.25 * flat(moved(0.1, 2)) + 0.5 * flat(moved(0.1, 3))
    np.testing.assert_allclose(flat(out), update, rtol=1e-5, atol=1e-5)


def test_an_update_level_sign_flip_is_bounded_and_within_ten_percent(caplog):
    """Sending the global weights minus an honest update has an ordinary norm: nothing drops it, but the
    cap and the clip bound what it moves (relative L2 of the aggregate against the honest one)."""
    honest = [reply(1, moved(0.1, 1)), reply(2, moved(0.1, 2))]
    reference, _ = aggregate(honest)
    flipped = {k: 2 * GLOBAL[k] - v for k, v in moved(0.1, 3).items()}
    out, _ = aggregate([*honest, reply(3, flipped)])
    relative = np.linalg.norm(flat(out) - flat(reference)) / np.linalg.norm(flat(reference))
    assert relative < 0.10, relative
    median, _ = aggregate([*honest, reply(3, flipped)], robust="median")
    assert np.linalg.norm(flat(median) - flat(reference)) < np.linalg.norm(flat(out) - flat(reference))


def ffa_cfg(tiny_cfg: Config, aggregation: str = "ffa") -> Config:
    return dataclasses.replace(tiny_cfg, fed=dataclasses.replace(tiny_cfg.fed, aggregation=aggregation))


def lora_deltas(model: RecModel) -> dict[str, torch.Tensor]:
    """Each LoRA layer's weight change scaling x B A."""
    out = {}
    for name, module in model.encoder.named_modules():
        if isinstance(module, LoraLayer):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            out[name] = (module.scaling["default"] * b @ a).detach().double()
    return out


def client_model(cfg: Config, seed: int) -> RecModel:
    torch.manual_seed(100 + seed)  # unrelated draws before building: A must not depend on them
    torch.rand(seed + 1)
    model = RecModel(cfg)
    with torch.no_grad():  # a client's training, as far as the adapters are concerned
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" in name:
                param.add_(torch.randn(param.shape) * 0.1)
    return model


def test_ffa_freezes_a_seeded_a_and_averaging_b_averages_the_updates_exactly(tiny_cfg):
    cfg = ffa_cfg(tiny_cfg)
    clients = [client_model(cfg, seed) for seed in (1, 2)]
    for name, param in clients[0].named_parameters():
        if "lora_A" in name:
            assert not param.requires_grad
            assert torch.equal(param, dict(clients[1].named_parameters())[name])
    sent = trainable_state(RecModel(cfg))
    assert sent and not any("lora_A" in k for k in sent) and any("lora_B" in k for k in sent)
    out, _ = aggregate(
        [reply(1, trainable_state(clients[0]), 10), reply(2, trainable_state(clients[1]), 30)],
        sent=sent,
        max_share=1.0,
        clip=0.0,
        outlier=0.0,
    )
    merged = RecModel(cfg)
    from shared.records import load_trainable

    load_trainable(merged, out)
    first, second = lora_deltas(clients[0]), lora_deltas(clients[1])
    for name, delta in lora_deltas(merged).items():
        torch.testing.assert_close(delta, 0.25 * first[name] + 0.75 * second[name], rtol=1e-5, atol=1e-7)

    # FedAvg of A and B separately is not the average of the updates B A
    plain = ffa_cfg(tiny_cfg, "fedavg")
    clients = [client_model(plain, seed) for seed in (1, 2)]
    sent = trainable_state(RecModel(plain))
    out, _ = aggregate(
        [reply(1, trainable_state(c), 10) for c in clients], sent=sent, max_share=1.0, clip=0.0, outlier=0.0
    )
    merged = RecModel(plain)
    load_trainable(merged, out)
    first, second = lora_deltas(clients[0]), lora_deltas(clients[1])
    gaps = [float((d - 0.5 * first[n] - 0.5 * second[n]).abs().max()) for n, d in lora_deltas(merged).items()]
    assert max(gaps) > 1e-3
