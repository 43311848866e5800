"""The causal sequence encoder and the loss at every position: causality, left padding, the all-positions
loss against the evaluation path one position at a time, and the item-space collapse check."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.evaluation import eval_sequences, score_users, seen_mask
from client.training import (
    Batch,
    build_model,
    history_tensor,
    loss_fn,
    make_batch,
    prepare,
    sampled_rank_logits,
    train_round,
)
from shared.config import Config
from shared.data import load_scenario
from shared.model import RecModel, mean_pairwise_cosine


def with_train(cfg: Config, **train: Any) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def randomise(model: RecModel, seed: int = 0) -> None:
    """Non-trivial weights everywhere the tests look: the encoder's output layer (zero at init: the user
    would be the causal mean alone), positions, the private memory and the head."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*model.user.parameters(), *model.head.parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
        if model.memory is not None:
            for p in model.memory.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def unit_vectors(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Random unit vectors along the last dimension (item vectors of the tiny encoder's width)."""
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


@pytest.fixture()
def video(tiny_cfg, demo_dir):
    data = prepare(load_scenario(demo_dir / "video"), tiny_cfg)
    model = build_model(tiny_cfg, data)
    randomise(model)
    model.eval()  # dropout off
    return data, model


@torch.no_grad()
def test_output_at_t_ignores_every_later_item(video):
    _, model = video
    generator = torch.Generator().manual_seed(1)
    items = unit_vectors(generator, 3, 8, 32)
    mask = torch.ones(3, 8, dtype=torch.bool)
    out = model.user(items, mask)
    assert out.shape == (3, 8, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 8))
    for t in range(7):
        changed = items.clone()
        changed[:, t + 1 :] = unit_vectors(generator, 3, 7 - t, 32)
        again = model.user(changed, mask)
        torch.testing.assert_close(again[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(again[:, t + 1 :], out[:, t + 1 :], atol=1e-3)  # later outputs do see them
    earlier = items.clone()
    earlier[:, 0] = unit_vectors(generator, 3, 32)
    assert not torch.allclose(model.user(earlier, mask)[:, -1], out[:, -1], atol=1e-3)  # the last sees all


@torch.no_grad()
def test_padded_positions_do_not_change_real_outputs(video):
    _, model = video
    generator = torch.Generator().manual_seed(2)
    items = unit_vectors(generator, 2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :5] = False  # 3 real items, left-padded
    mask[1, :1] = False
    out = model.user(items, mask)
    assert torch.isfinite(out).all()  # a padded query attends to itself: no NaN row
    garbage = items.clone()
    garbage[~mask] = 10 * torch.randn(int((~mask).sum()), 32, generator=generator)
    torch.testing.assert_close(model.user(garbage, mask)[mask], out[mask], rtol=0, atol=1e-6)
    # user_vectors reads catalog rows, padding (-1) included: the result is the same with any row behind it
    table, _ = model.item_table()
    history = history_tensor([np.array([4, 9, 2]), np.array([7, 1, 3, 3, 8, 0, 5])], 8)
    assert history[0, :5].eq(-1).all() and history[1, 0] == -1
    users = model.user_vectors(history, table)
    moved = table.clone()
    moved[0] = -moved[0]  # the row padding (-1) is clamped to
    after = model.user_vectors(history, moved)
    torch.testing.assert_close(after[0], users[0], rtol=0, atol=1e-6)  # read, but masked
    assert not torch.allclose(after[1], users[1], atol=1e-3)  # user 1 really has item 0


def reference_loss(
    model: RecModel, batch: Batch, row: int, table: torch.Tensor, bias: torch.Tensor, whole: np.ndarray
) -> tuple:
    """One user's loss computed the slow way, one position at a time through the evaluation path: for each
    position t, the prefix up to t left-padded by ``history_tensor``, ``user_vectors``, ``scores`` over the
    catalog with the repeat logit on every item of the user's whole training sequence ``whole`` up to item t
    (:func:`seen_mask`, found by matching the window in it), the cross-entropy of item t+1; the aux BCE of
    item t+1's label on the same user vector.
    Returns (sum of cross-entropies, number of positions, sum of BCEs, number of labelled positions)."""
    seq = batch.seq[row]
    real = seq[seq >= 0]
    labels = batch.labels[row][seq >= 0]  # (n, K)
    starts = [s for s in range(len(whole) - len(real) + 1) if (whole[s : s + len(real)] == real.numpy()).all()]
    assert starts, "the window is a slice of the user's sequence"
    ce, bce, labelled = [], [], 0
    for t in range(len(real) - 1):
        prefix = history_tensor([real[: t + 1].numpy()], model.cfg.model.history)
        user = model.user_vectors(prefix, table)  # (1, H)
        target = real[t + 1 : t + 2]
        seen = seen_mask([whole[: starts[-1] + t + 1]], model.num_items)
        ce.append(F.cross_entropy(model.scores(user, table, bias, seen), target))
        if not torch.isnan(labels[t + 1, 1]):
            logit = model.head.pairs(user, table[target])[0, 0]
            bce.append(F.binary_cross_entropy_with_logits(logit, labels[t + 1, 1]))
            labelled += 1
    return torch.stack(ce).sum(), len(ce), (torch.stack(bce).sum() if bce else torch.tensor(0.0)), labelled


@torch.no_grad()
def test_all_positions_loss_equals_the_per_position_losses_one_at_a_time(tiny_cfg, demo_dir):
    """``train.fresh-items`` = 0: the full-catalog softmax and the aux BCE only. Positional embeddings are
    zeroed for the position-by-position comparison: in the one-pass loss the item before target t sits in
    window slot t, on the evaluation path (left padding) always in the last slot (as in SASRec); at the
    window's last position both paths are the same, which is checked with the learned positions on."""
    cfg = with_train(tiny_cfg, fresh_items=0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, history=4))  # demo users have 2-6 items
    data = prepare(load_scenario(demo_dir / "video"), cfg)  # video logs satisfaction: the aux objective counts
    model = build_model(cfg, data)
    randomise(model)
    model.eval()
    text = model.text_table()
    table, bias = model.item_table()
    lengths = np.array([len(data.split.train[u]) for u in data.trainable_users])
    short = data.trainable_users[np.flatnonzero(lengths <= 3)[:2]]  # left-padded windows
    long = data.trainable_users[np.flatnonzero(lengths > cfg.model.history + 1)[:2]]  # windows that are full
    users = np.concatenate([short, long])
    assert len(users) == 4
    batch = make_batch(data, cfg, users, model.num_items, np.random.default_rng(0))
    assert batch.fresh.shape == (4, 0)
    assert (batch.seq[:2] < 0).any() and (batch.seq[2:] >= 0).all()

    # with the learned positions: the window's last position is exactly the evaluation path
    inputs = batch.seq[:, :-1]
    last = model.user(table[inputs.clamp(min=0)], inputs >= 0)[:, -1]
    torch.testing.assert_close(last, model.user_vectors(inputs, table), rtol=0, atol=1e-6)

    model.user.position.weight.zero_()
    weight = 0.7
    total, parts = loss_fn(model, batch, text, weight, shared=True)
    expected, labelled_any = [], False
    for row in range(len(users)):
        one = Batch(batch.seq[row : row + 1], batch.labels[row : row + 1], batch.fresh[row : row + 1])
        one.at, one.first = batch.at[row : row + 1], batch.first[row : row + 1]
        got, one_parts = loss_fn(model, one, text, weight, shared=True)
        whole = data.split.train[users[row]]
        ce, positions, bce, labelled = reference_loss(model, batch, row, table, bias, whole)
        assert one_parts["positions"] == positions >= 1
        assert one_parts["loss_rank"] == pytest.approx(float(ce) / positions, abs=1e-5)
        want = ce / positions + (weight * bce / labelled if labelled else 0.0)
        assert float(got) == pytest.approx(float(want), abs=1e-5)
        labelled_any |= labelled > 0
        expected.append(float(got))
    assert labelled_any  # the aux term was really compared
    assert model.memory is not None and model.memory.repeat is not None and float(model.memory.repeat) != 0
    assert float(total) == pytest.approx(float(np.mean(expected)), abs=1e-5)  # the batch loss: mean over users
    # the DP path (every position scored, padding masked out) gives the same loss as the packed one
    assert float(loss_fn(model, batch, text, weight, shared=False)[0]) == pytest.approx(float(total), abs=1e-5)
    assert parts["positions"] == sum((batch.seq[r] >= 0).sum().item() - 1 for r in range(len(users)))


@torch.no_grad()
def test_sampled_softmax_with_every_item_as_negative_is_the_full_softmax(video):
    """The sampled loss's logits against the target plus every catalog item (the target among them masked)
    give the full-catalog cross-entropy exactly; with fewer negatives the loss is smaller (fewer terms)."""
    _, model = video
    table, bias = model.item_table()
    generator = torch.Generator().manual_seed(3)
    users = unit_vectors(generator, 9, table.shape[1])
    targets = torch.randint(model.num_items, (9,), generator=generator)
    full = F.cross_entropy(model.scores(users, table, bias), targets, reduction="none")
    every = sampled_rank_logits(model, users, targets, table, bias, torch.arange(model.num_items))
    assert every.shape == (9, 1 + model.num_items)
    zero = torch.zeros(9, dtype=torch.long)
    torch.testing.assert_close(F.cross_entropy(every, zero, reduction="none"), full, rtol=0, atol=1e-5)
    few = sampled_rank_logits(model, users, targets, table, bias, torch.arange(5))
    assert (F.cross_entropy(few, zero, reduction="none") < full).all()


def test_negatives_are_sampled_per_step_and_a_catalog_no_larger_trains_exactly_as_before(tiny_cfg, demo_dir):
    """``train.negatives`` = K: K distinct catalog items per step, different across steps; a catalog of at
    most K items keeps the full softmax and the same random stream, so its round is bit-identical."""
    data = prepare(load_scenario(demo_dir / "video"), tiny_cfg)
    n = data.scenario.num_items
    rng = np.random.default_rng(0)
    users = data.trainable_users[:8]
    sampled = with_train(tiny_cfg, negatives=7)
    first = make_batch(data, sampled, users, n, rng).negatives[0]
    second = make_batch(data, sampled, users, n, rng).negatives[0]
    assert first is not None and second is not None
    assert len(set(first.tolist())) == 7 and 0 <= int(first.min()) and int(first.max()) < n
    assert not torch.equal(first, second)
    assert make_batch(data, with_train(tiny_cfg, negatives=n), users, n, rng).negatives == (None,)
    assert make_batch(data, sampled, users, n, rng, per_user=True).negatives == ()  # DP: the full softmax

    def trained(cfg: Config) -> dict[str, torch.Tensor]:
        model = build_model(cfg, data)
        train_round(model, data, with_train(cfg, local_steps=3), server_round=1)
        return {k: v.clone() for k, v in model.state_dict().items()}

    base = trained(tiny_cfg)
    same = trained(with_train(tiny_cfg, negatives=n))
    assert all(torch.equal(base[k], same[k]) for k in base)
    moved = trained(sampled)
    assert any(not torch.equal(base[k], moved[k]) for k in base)  # sampling changes training, and it trains


def test_train_round_reports_item_cosine_and_the_item_space_does_not_collapse(tiny_cfg, demo_dir):
    """Mean pairwise cosine of the item table (measured on the tiny encoder, demo shop: 0.946 at init,
    0.944 after 3 steps, 0.940 after 25 (measured before memory dropout); a deliberately collapsing run, train.lr =
    train.lora-lr = 1.0, memory dropout off: 0.998 before; with the default memory dropout it stays at 0.855).
    The tiny random BERT's texts already share most of their direction, so the bound is halfway from
    the initial value to 1 (0.973) rather than a fixed margin."""
    data = prepare(load_scenario(demo_dir / "shop"), tiny_cfg)
    model = build_model(tiny_cfg, data)
    init = mean_pairwise_cosine(model.item_table()[0])
    bound = init + 0.5 * (1.0 - init)
    before = model.item_table()[0]
    stats = train_round(model, data, tiny_cfg, server_round=1)
    after = model.item_table()[0]
    assert not torch.equal(after, before)  # it trained
    assert stats["item_cosine"] == pytest.approx(mean_pairwise_cosine(after), abs=1e-9)
    assert stats["item_cosine"] < bound, (init, bound, stats["item_cosine"])

    collapsing = with_train(tiny_cfg, lr=1.0, lora_lr=1.0, fresh_items=1)
    collapsing = dataclasses.replace(collapsing, model=dataclasses.replace(collapsing.model, memory_dropout=0.0))
    model = build_model(collapsing, data)
    assert mean_pairwise_cosine(model.item_table()[0]) == pytest.approx(init, abs=1e-9)
    stats = train_round(model, data, collapsing, server_round=1)
    assert stats["item_cosine"] > bound, (init, bound, stats["item_cosine"])


def test_mean_pairwise_cosine_by_hand():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    unit = F.normalize(vectors, dim=-1)
    pairs = [float(unit[i] @ unit[j]) for i in range(3) for j in range(3) if i != j]
    assert mean_pairwise_cosine(vectors) == pytest.approx(np.mean(pairs))
    assert mean_pairwise_cosine(torch.ones(5, 3)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(vectors[:1]) == 0.0


def test_text_table_is_recomputed_exactly_when_the_adapters_change(video):
    _, model = video
    model.train()  # dropout on in the model: the table is still the eval-mode one
    first = model.text_table()
    assert model.encoder.training
    model.eval()
    index = torch.arange(model.num_items)
    fresh = torch.cat([model.encode_items(index[s : s + 5]) for s in range(0, len(index), 5)])
    torch.testing.assert_close(first, fresh)
    assert model.text_table() is first  # adapters unchanged: the kept table
    lora = next(p for n, p in model.encoder.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora.add_(0.5)
    changed = model.text_table()
    assert changed is not first and not torch.allclose(changed, first)
    with torch.no_grad():
        lora.sub_(0.5)
    torch.testing.assert_close(model.text_table(), first)


def test_text_tables_are_shared_between_models_with_the_same_catalog_and_adapters(tiny_cfg, demo_dir):
    """A federated client rebuilds its model for every message: the evaluation's table (global weights) is
    the next round's training table, computed once per process; other adapters or a LoRA scaling give
    another table."""
    data = prepare(load_scenario(demo_dir / "video"), tiny_cfg)
    first, second = build_model(tiny_cfg, data), build_model(tiny_cfg, data)
    table = first.text_table()
    assert second.text_table() is table
    lora = next(p for n, p in second.encoder.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora.add_(0.5)
    assert second.text_table() is not table and first.text_table() is table
    scaled = dataclasses.replace(tiny_cfg, lora=dataclasses.replace(tiny_cfg.lora, alpha=2 * tiny_cfg.lora.alpha))
    third = build_model(scaled, data)
    with torch.no_grad():
        next(p for n, p in third.encoder.named_parameters() if "lora_B" in n).add_(0.5)
    assert not torch.allclose(third.text_table(), second.text_table())


def test_item_space_cosine_samples_large_catalogs(tiny_cfg, demo_dir, monkeypatch):
    """Above COSINE_SAMPLE items the collapse check reads a random sample of the item space (a round
    would otherwise pay one more catalog encoding); below it, every item."""
    import client.training as training

    data = prepare(load_scenario(demo_dir / "video"), tiny_cfg)
    model = build_model(tiny_cfg, data)
    randomise(model)
    full = mean_pairwise_cosine(model.item_table()[0])
    assert training.item_space_cosine(model, np.random.default_rng(0)) == pytest.approx(full, abs=1e-9)
    monkeypatch.setattr(training, "COSINE_SAMPLE", model.num_items // 3)
    rng = np.random.default_rng(0)
    sample = np.sort(np.random.default_rng(0).choice(model.num_items, model.num_items // 3, replace=False))
    estimate = training.item_space_cosine(model, rng)
    assert estimate == pytest.approx(mean_pairwise_cosine(model.item_table()[0][sample]), abs=1e-6)
    assert estimate == pytest.approx(full, abs=0.05)


def test_the_repeat_logits_gradient_is_the_softmax_share_of_the_users_own_items_minus_its_repeats(tiny_cfg, demo_dir):
    """The repeat logit w is added to every item a user had up to a position (its whole training sequence
    so far, not only the window the encoder reads). For a softmax cross-entropy, d loss / d w at one
    position = (probability mass on the items the user had) - 1[the next item is one of them]: w falls
    where users do not repeat and rises where they do. Checked against autograd, the seen sets built here
    from the scenario's own sequences."""
    cfg = with_train(tiny_cfg, fresh_items=0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, history=4))
    data = prepare(load_scenario(demo_dir / "video"), cfg)
    model = build_model(cfg, data)
    randomise(model)
    model.eval()
    assert model.memory is not None and model.memory.repeat is not None
    text = model.text_table()
    users = data.trainable_users[:12]
    batch = make_batch(data, cfg, users, model.num_items, np.random.default_rng(1))
    model.zero_grad()
    loss_fn(model, batch, text, 0.0, shared=True)[0].backward()
    got = float(model.memory.repeat.grad)

    with torch.no_grad():
        table, bias = model.item_table()
        inputs, targets = batch.seq[:, :-1], batch.seq[:, 1:]
        states = model.user(table[inputs.clamp(min=0)], inputs >= 0)  # (B, T, H)
        per_user, repeats = [], 0
        for row, u in enumerate(users):
            whole = data.split.train[u]
            window = batch.seq[row][batch.seq[row] >= 0].numpy()
            start = next(s for s in range(len(whole)) if np.array_equal(whole[s : s + len(window)], window))
            offset = int((batch.seq[row] < 0).sum())  # left padding
            terms = []
            for t in range(len(window) - 1):
                had = torch.zeros(model.num_items, dtype=torch.bool)
                had[list(set(whole[: start + t + 1].tolist()))] = True
                p = torch.softmax(model.scores(states[row, offset + t], table, bias, had), dim=-1)
                target = int(targets[row, offset + t])
                terms.append(float(p[had].sum()) - float(had[target]))
                repeats += int(had[target])
            per_user.append(np.mean(terms))
    assert got == pytest.approx(float(np.mean(per_user)), abs=1e-5)
    assert got != 0 and repeats > 0  # demo users sometimes repeat: both terms were exercised


def test_evaluation_adds_the_repeat_logit_to_each_users_own_items_only(tiny_cfg, demo_dir):
    """Full-ranking scores with the users' sequences = the scores without them + w on exactly the items of
    each user's sequence (its items older than the encoder's window included)."""
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, history=3))
    data = prepare(load_scenario(demo_dir / "video"), cfg)
    model = build_model(cfg, data)
    randomise(model)
    assert model.memory is not None and model.memory.repeat is not None
    w = float(model.memory.repeat)
    assert w != 0
    sequences, _ = eval_sequences(data, "test")
    history = history_tensor(sequences, model.cfg.model.history)
    table = model.item_table()
    plain = score_users(model, history, table)
    scored = score_users(model, history, table, sequences, batch_size=7)  # several batches
    for row, seq in enumerate(sequences):
        had = np.zeros(model.num_items, dtype=bool)
        had[seq] = True
        torch.testing.assert_close(scored[row, ~had], plain[row, ~had], rtol=0, atol=1e-5)  # other batches
        torch.testing.assert_close(scored[row, had], plain[row, had] + w, rtol=0, atol=1e-5)
    assert any(len(s) > model.cfg.model.history for s in sequences)  # older items than the window were there


@torch.no_grad()
def test_the_sampled_loss_with_every_item_as_negative_is_the_full_loss_repeat_logit_included(tiny_cfg, demo_dir):
    """Through ``loss_fn``: the sampled softmax whose negatives are the whole catalog gives the full-catalog
    loss, so the repeat logit reaches the target and every negative there exactly as in the full softmax."""
    cfg = with_train(tiny_cfg, fresh_items=0)
    data = prepare(load_scenario(demo_dir / "video"), cfg)
    model = build_model(cfg, data)
    randomise(model)
    model.eval()
    assert model.memory is not None and model.memory.repeat is not None
    model.memory.repeat.fill_(-3.0)
    text = model.text_table()
    batch = make_batch(data, cfg, data.trainable_users[:16], model.num_items, np.random.default_rng(2))
    full = loss_fn(model, batch, text, 0.0, shared=True)[1]["loss_rank"]
    every = dataclasses.replace(batch, negatives=(torch.arange(model.num_items),))
    assert loss_fn(model, every, text, 0.0, shared=True)[1]["loss_rank"] == pytest.approx(full, abs=1e-5)
    plain = dataclasses.replace(every, at=None, first=None)  # without the repeat logit: another loss
    assert loss_fn(model, plain, text, 0.0, shared=True)[1]["loss_rank"] != pytest.approx(full, abs=1e-3)
