"""The scenario-private item memory: never in a reply, kept in the client's state folder across rounds and
process restarts, loaded by item id onto a changed catalog, picked up by a resumed run at the checkpoint's
round, and served with the checkpoint it belongs to."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Message, RecordDict
from safetensors.torch import load_file
from test_client import context

import client.app
from client.app import train
from client.evaluation import seen_mask
from client.serving import Recommender, Request
from client.state import PRIVATE_FILE, load_private, private_source, private_state, round_copy, save_private
from client.training import LocalData, build_model, prepare
from server.rounds import initial_weights
from server.strategy import expected_from
from shared.checkpoint import save_checkpoint
from shared.config import Config
from shared.data import load_scenario
from shared.model import PRIVATE_PREFIX, RecModel
from shared.records import (
    ARRAYS,
    CONFIG,
    from_arrayrecord,
    load_trainable,
    to_arrayrecord,
    trainable_state,
    validate_arrays,
)


def train_message(weights: dict[str, np.ndarray], server_round: int) -> Message:
    content = RecordDict({ARRAYS: to_arrayrecord(weights), CONFIG: ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=1, message_type="train")


def starts_of_training(monkeypatch, capture):
    """What ``capture(model)`` returns at the start of every ``train_round`` the client app calls, in order."""
    started = []
    real_train_round = client.app.train_round

    def spy(model, *args, **kwargs):
        started.append(capture(model))
        return real_train_round(model, *args, **kwargs)

    monkeypatch.setattr(client.app, "train_round", spy)
    return started


def memory_only(cfg: Config) -> Config:
    """The config with the item memory as the client's only private state (no personal modules)."""
    return dataclasses.replace(cfg, fed=dataclasses.replace(cfg.fed, personal=""))


def test_memory_never_leaves_the_client_and_the_next_round_starts_from_it(tiny_cfg, demo_dir, tmp_path, monkeypatch):
    assert tiny_cfg.model.item_memory
    tiny_cfg = memory_only(tiny_cfg)
    _, weights, _ = initial_weights(tiny_cfg)
    expected = set(trainable_state(RecModel(tiny_cfg)))
    assert set(weights) == expected and not any(k.startswith(PRIVATE_PREFIX) for k in expected)

    started = starts_of_training(monkeypatch, private_state)  # the private memory each round starts from
    private = tmp_path / "run" / "clients" / "shop" / PRIVATE_FILE
    replies = []
    saved = []
    for server_round in (1, 2):  # each call builds its model from scratch, as a new process would
        out = train(train_message(weights, server_round), context(tiny_cfg, demo_dir, 0, tmp_path / "run"))
        sent = from_arrayrecord(out.content.array_records[ARRAYS])
        assert set(sent) == expected, set(sent) ^ expected
        assert validate_arrays(sent, expected_from(weights)) == []  # what the server accepts
        assert not any(k.startswith(PRIVATE_PREFIX) or "memory" in k for k in sent)
        copy = round_copy(private, str(tmp_path / "run"), server_round)
        assert private.is_file() and copy.is_file()
        saved.append(load_file(str(private)))
        assert saved[-1].keys() == {"memory.residual.weight", "memory.bias.weight", "memory.repeat"}
        assert all(t.abs().sum() > 0 for t in saved[-1].values())  # it trained
        torch.testing.assert_close(load_file(str(copy)), saved[-1], rtol=0, atol=0)
        replies.append(sent)
    assert all(t.abs().sum() == 0 for t in started[0].values())  # round 1: text alone
    torch.testing.assert_close(started[1], saved[0], rtol=0, atol=0)  # round 2: exactly what round 1 kept
    assert any(not torch.equal(saved[1][k], saved[0][k]) for k in saved[0])

    # round 2 from zero (a client without the file) ends elsewhere, memory and shared weights alike
    out = train(train_message(weights, 2), context(tiny_cfg, demo_dir, 0, tmp_path / "other"))
    from_zero = load_file(str(tmp_path / "other" / "clients" / "shop" / PRIVATE_FILE))
    assert any(not torch.equal(from_zero[k], saved[1][k]) for k in from_zero)
    sent = from_arrayrecord(out.content.array_records[ARRAYS])
    assert any(not np.array_equal(sent[k], replies[1][k]) for k in sent)


@pytest.mark.parametrize("epsilon", [0.0, 8.0], ids=["plain", "dp"])
def test_personal_modules_are_sent_but_each_round_starts_from_the_clients_own_copy(
    tiny_cfg, demo_dir, tmp_path, monkeypatch, epsilon
):
    """fed.personal = "user": the sequence encoder still travels (the global model for newcomers), but
    round 2 starts from what this client trained in round 1, not from the global weights it is sent;
    the modules not named (head, LoRA) start from the global weights as before. Under DP too."""
    cfg = dataclasses.replace(
        tiny_cfg,
        fed=dataclasses.replace(tiny_cfg.fed, personal="user"),
        privacy=dataclasses.replace(tiny_cfg.privacy, epsilon=epsilon),
    )
    _, weights, _ = initial_weights(cfg)
    started = starts_of_training(monkeypatch, trainable_state)  # every shared weight each round starts from
    sent = []
    for server_round in (1, 2):  # the server sends the same global weights twice
        out = train(train_message(weights, server_round), context(cfg, demo_dir, 0, tmp_path / "run"))
        sent.append(from_arrayrecord(out.content.array_records[ARRAYS]))
        assert set(sent[-1]) == set(weights)  # the personal modules are still sent
    kept = load_file(str(tmp_path / "run" / "clients" / "shop" / PRIVATE_FILE))
    user = {k for k in weights if k.startswith("user.")}
    assert user and user <= set(kept) and not any(k.startswith("head.") for k in kept)
    for name in weights:
        assert np.array_equal(started[0][name], weights[name]), name  # round 1: the global weights
        want = sent[0][name] if name in user else weights[name]  # round 2: its own copy of the personal ones
        assert np.array_equal(started[1][name], want), name
    assert any(not np.array_equal(sent[0][k], weights[k]) for k in user)  # they trained

    # a private file written without personal modules leaves the global ones; a wrong shape is an error
    data = prepare(load_scenario(demo_dir / "shop"), cfg)
    plain = build_model(memory_only(tiny_cfg), data)
    save_private(plain, tmp_path / "plain" / PRIVATE_FILE, "shop", data.scenario.item_ids)
    model = build_model(cfg, data)
    with torch.no_grad():  # global weights that differ from the plain model's
        for name, param in model.named_parameters():
            if name.startswith("user."):
                param.add_(1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("user.")}
    load_private(model, tmp_path / "plain" / PRIVATE_FILE, data.scenario.item_ids)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    wide = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seq_dim=2 * cfg.model.seq_dim))
    save_private(build_model(wide, data), tmp_path / "wide" / PRIVATE_FILE, "shop", data.scenario.item_ids)
    with pytest.raises(ValueError, match="'user.inp.weight' has shape .* written by a different model"):
        load_private(model, tmp_path / "wide" / PRIVATE_FILE, data.scenario.item_ids)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # nothing loaded


def test_personal_names_only_shared_modules():
    assert Config.from_run_config({"fed.personal": "user, head"}).fed.personal_modules == ("user", "head")
    with pytest.raises(ValueError, match="fed.personal.*'memory'"):
        Config.from_run_config({"fed.personal": "user,memory"})


def test_item_memory_needs_a_state_folder(tiny_cfg, demo_dir):
    _, weights, _ = initial_weights(tiny_cfg)
    with pytest.raises(ValueError, match="item-memory and fed.personal need a place for the client.s private state"):
        train(train_message(weights, 1), context(tiny_cfg, demo_dir, 0))


def random_memory(model: RecModel, seed: int) -> None:
    assert model.memory is not None
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.memory.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))


def test_private_state_survives_a_restart_and_loads_by_item_id(tiny_cfg, demo_dir, tmp_path):
    tiny_cfg = memory_only(tiny_cfg)
    data = prepare(load_scenario(demo_dir / "shop"), tiny_cfg)
    model = build_model(tiny_cfg, data)
    random_memory(model, 0)
    ids, texts = data.scenario.item_ids, data.scenario.texts
    path = tmp_path / "state" / PRIVATE_FILE
    save_private(model, path, "shop", ids)

    restarted = build_model(tiny_cfg, data)  # a brand-new model from the same config: memory at zero
    assert all(p.abs().sum() == 0 for p in private_state(restarted).values())
    assert load_private(restarted, path, ids) == len(ids)
    saved = private_state(model)
    for name, value in private_state(restarted).items():
        assert torch.equal(value, saved[name]), name
    assert torch.equal(restarted.item_table()[0], model.item_table()[0])
    assert torch.equal(restarted.item_table()[1], model.item_table()[1])

    # a changed catalog: item 3 removed, one new item, and the order reversed: rows follow the ids
    keep = [i for i in range(len(ids)) if i != 3][::-1]
    new_ids = ["shop-new", *[ids[i] for i in keep]]
    new_texts = ["deluxe hiking tent set for sale", *[texts[i] for i in keep]]
    changed = RecModel(tiny_cfg)
    changed.attach_catalog(new_texts)
    assert load_private(changed, path, new_ids) == len(ids) - 1
    assert changed.memory is not None and model.memory is not None
    for new_row, old_row in enumerate([None, *keep]):
        for table, old in ((changed.memory.residual, model.memory.residual), (changed.memory.bias, model.memory.bias)):
            want = torch.zeros_like(old.weight[0]) if old_row is None else old.weight[old_row]
            assert torch.equal(table.weight[new_row], want), (new_row, old_row)

    # a file that is not a private state is an error naming it; a model without a memory writes nothing
    path.with_name("bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors is unreadable"):
        load_private(changed, path.with_name("bad.safetensors"), new_ids)
    plain = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, item_memory=False))
    without = build_model(plain, data)
    assert without.memory is None and not private_state(without)
    save_private(without, tmp_path / "none" / PRIVATE_FILE, "shop", ids)
    assert not (tmp_path / "none").exists()


def test_a_run_starts_from_text_alone_and_a_resumed_run_from_the_checkpoints_round(tiny_cfg, tmp_path):
    """Which private copy a client loads: its own run's, up to the round it needs; a resumed run's, up to
    the checkpoint's round; never another run's (in a simulation each run has its folder, a client daemon
    keeps every run in one state folder)."""
    old, new = tmp_path / "runs" / "old", tmp_path / "runs" / "new"

    def cfg_for(run, resume=None):
        flat = tiny_cfg.to_flat() | {"run.dir": str(run)}
        if resume is not None:
            flat |= {"run.resume": str(old / "checkpoints" / f"round-{resume:04d}")}
        return Config.from_run_config(flat)

    def touch(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return path

    mine = old / "clients" / "news" / PRIVATE_FILE
    first, third = touch(round_copy(mine, str(old), 1)), touch(round_copy(mine, str(old), 3))
    touch(mine)
    assert private_source(cfg_for(old), mine, "news", 0) is None  # training round 1: text alone
    assert private_source(cfg_for(old), mine, "news", 1) == first  # training round 2, evaluating round 1
    assert private_source(cfg_for(old), mine, "news", 2) == first  # the latest round it trained, up to 2
    assert private_source(cfg_for(old), mine, "news", 5) == third

    theirs = new / "clients" / "news" / PRIVATE_FILE
    assert private_source(cfg_for(new), theirs, "news", 4) is None  # a new run: not the old run's memory
    assert private_source(cfg_for(new, resume=2), theirs, "news", 2) == first  # resumed after round 2
    assert private_source(cfg_for(new, resume=3), theirs, "news", 3) == third
    assert private_source(cfg_for(new, resume=3), theirs, "news", 9) == third  # not past the checkpoint
    own = touch(round_copy(theirs, str(new), 4))
    assert private_source(cfg_for(new, resume=3), theirs, "news", 4) == own  # its own copies once written

    daemon = tmp_path / "state" / PRIVATE_FILE  # one state folder for every run
    kept = touch(round_copy(daemon, str(old), 1))
    touch(round_copy(daemon, str(tmp_path / "another"), 2))
    touch(daemon)
    assert private_source(cfg_for(new), daemon, "news", 3) is None
    assert private_source(cfg_for(new, resume=1), daemon, "news", 1) == kept
    assert private_source(cfg_for(new, resume=2), daemon, "news", 2) == kept


def served_video_model(cfg: Config, demo_dir) -> tuple[RecModel, LocalData]:
    """The video scenario's model, made non-trivial: shared weights moved, a private memory whose residuals
    and biases reorder items."""
    data = prepare(load_scenario(demo_dir / "video"), cfg)
    model = build_model(cfg, data)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # a non-trivial shared model
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        assert model.memory is not None
        model.memory.residual.weight.normal_(0, 0.5)
        model.memory.bias.weight.normal_(0, 3.0)
        assert model.memory.repeat is not None
        model.memory.repeat.fill_(-2.0)  # the user's own items down, as a scenario that rarely repeats learns
    return model, data


def test_serving_uses_the_private_memory_of_the_checkpoints_run(tiny_cfg, demo_dir, tmp_path):
    model, data = served_video_model(tiny_cfg, demo_dir)
    weights = trainable_state(model)
    with_memory = save_checkpoint(tmp_path / "with", 1, weights, tiny_cfg, {})
    text_alone = save_checkpoint(tmp_path / "without", 1, weights, tiny_cfg, {})
    save_private(model, tmp_path / "with" / "clients" / "video" / PRIVATE_FILE, "video", data.scenario.item_ids)
    # another scenario's file in the run folder is not this scenario's memory
    save_private(model, tmp_path / "without" / "clients" / "video" / PRIVATE_FILE, "shop", data.scenario.item_ids)

    cache = tmp_path / "cache"
    served = Recommender(with_memory, [demo_dir / "video"], cache)
    plain = Recommender(text_alone, [demo_dir / "video"], cache)  # no file for video: text alone, no error
    assert len(list(cache.glob("*.safetensors"))) == 2  # one cache entry each: the memory is in the key
    mine, theirs = served.catalogs["video"], plain.catalogs["video"]
    table, bias = model.item_table()
    torch.testing.assert_close(mine.table, table, rtol=0, atol=1e-6)
    torch.testing.assert_close(mine.bias, bias, rtol=0, atol=0)
    assert model.adaptor is not None
    text = F.normalize(model.adaptor(model.text_table()), dim=-1)  # text alone, through the shared adaptor
    torch.testing.assert_close(theirs.table, text, rtol=0, atol=1e-6)
    assert theirs.bias.abs().sum() == 0
    assert not torch.allclose(mine.table, theirs.table, atol=1e-3)

    request = Request(scenario="video", user_id="video-user-0004", k=20)
    got = [data.scenario.item_ids.index(r["item_id"]) for r in served.recommend(request)]
    alone = [data.scenario.item_ids.index(r["item_id"]) for r in plain.recommend(request)]
    assert got != alone
    whole = mine.histories["video-user-0004"]
    rows = torch.from_numpy(whole[-tiny_cfg.model.history :])
    with torch.no_grad():
        user = model.user_from_vectors(table[rows])  # the history read through the memory too
        had = seen_mask([whole], model.num_items)  # its own items get the private repeat logit
        expected = torch.argsort(model.scores(user, table, bias, had)[0], descending=True)[:20].tolist()
        without = torch.argsort(model.scores(user, table, bias)[0], descending=True)[:20].tolist()
        user_text = model.user_from_vectors(text[rows])  # text alone: no memory, so no repeat logit either
        expected_alone = torch.argsort(model.scores(user_text, text, torch.zeros_like(bias))[0], descending=True)
    assert expected != without  # the repeat logit changes this list: serving must apply it
    assert got == expected
    assert alone == expected_alone[:20].tolist()

    # a client's state folder given to the service is read before the run folder
    state = tmp_path / "state"
    save_private(model, state / PRIVATE_FILE, "video", data.scenario.item_ids)
    again = Recommender(text_alone, [demo_dir / "video"], state_dirs=[state])
    torch.testing.assert_close(again.catalogs["video"].bias, bias, rtol=0, atol=0)


def test_serving_uses_each_scenarios_personal_modules(tiny_cfg, demo_dir, tmp_path):
    """One service, two scenarios, each with its own personal sequence encoder, head and adaptor (as its
    client trained them) on one checkpoint: each scenario is served by its own, from a fresh table and
    from a cached one alike, and the checkpoint's global modules stay as they are."""
    assert set(tiny_cfg.fed.personal_modules) == {"user", "head", "adaptor"}
    video, video_data = served_video_model(tiny_cfg, demo_dir)
    weights = trainable_state(video)
    checkpoint = save_checkpoint(tmp_path / "run", 1, weights, tiny_cfg, {})
    shop_data = prepare(load_scenario(demo_dir / "shop"), tiny_cfg)
    shop = build_model(tiny_cfg, shop_data)
    load_trainable(shop, weights)
    models = {"video": (video, video_data), "shop": (shop, shop_data)}
    for seed, (name, (model, data)) in enumerate(models.items()):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # each client's own copies, away from the global ones and from each other
            for n, p in model.named_parameters():
                if n.split(".")[0] in ("user", "head", "adaptor"):
                    p.add_(0.3 * torch.randn(p.shape, generator=generator))
        save_private(model, tmp_path / "run" / "clients" / name / PRIVATE_FILE, name, data.scenario.item_ids)

    cache = tmp_path / "cache"
    first = Recommender(checkpoint, [demo_dir / "video", demo_dir / "shop"], cache)
    assert len(list(cache.glob("*.safetensors"))) == 2
    for served in (first, Recommender(checkpoint, [demo_dir / "shop", demo_dir / "video"], cache)):  # then cached
        for name, (model, data) in models.items():
            model.eval()
            catalog = served.catalogs[name]
            table, bias = model.item_table()
            torch.testing.assert_close(catalog.table, table, rtol=0, atol=1e-6)
            user_id = data.scenario.users[4]
            request = Request(scenario=name, user_id=user_id, k=10)
            got = [data.scenario.item_ids.index(r["item_id"]) for r in served.recommend(request)]
            rows = torch.from_numpy(catalog.histories[user_id][-tiny_cfg.model.history :])
            with torch.no_grad():
                user = model.user_from_vectors(table[rows])
                torch.testing.assert_close(served._user(request, catalog)[0], user, rtol=0, atol=1e-6)
                had = seen_mask([catalog.histories[user_id]], model.num_items)
                expected = torch.argsort(model.scores(user, table, bias, had)[0], descending=True)[:10].tolist()
            assert got == expected, name
        global_state = trainable_state(served.model)
        assert all(np.array_equal(global_state[k], weights[k]) for k in weights)


def test_serving_a_round_uses_the_memory_that_round_was_evaluated_with(tmp_path):
    """A checkpoint of round r is served with the copy of the memory the client kept after round r of that
    run, not with its latest file (the run folder means the round chosen on validation, often not the last)."""
    from client.serving import private_file

    run = tmp_path / "run"
    checkpoint = run / "checkpoints/round-0002"
    checkpoint.mkdir(parents=True)
    latest = run / "clients/news" / PRIVATE_FILE

    def write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({"memory.bias.weight": torch.zeros(1, 1)}, str(path), metadata={"scenario": "news"})
        return path

    write(latest)
    assert private_file(checkpoint, "news", [], str(run)) == latest  # no round copy: the latest
    kept = write(round_copy(latest, str(run), 2))
    write(round_copy(latest, str(run), 3))
    write(round_copy(latest, str(tmp_path / "another-run"), 2))
    assert private_file(checkpoint, "news", [], str(run)) == kept
    assert private_file(run / "checkpoints/round-0003", "news", [], str(run)).name == "round-0003.safetensors"
    state = tmp_path / "state"  # a daemon's state folder given to the service: its copy of round 2 first
    daemon = write(round_copy(state / PRIVATE_FILE, str(run), 2))
    assert private_file(checkpoint, "news", [state], str(run)) == daemon


def test_memory_dropout_drops_whole_residuals_in_training_only(tiny_cfg, demo_dir):
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, memory_dropout=0.5))
    data = prepare(load_scenario(demo_dir / "video"), cfg)
    model = build_model(cfg, data)
    random_memory(model, 3)
    index = torch.arange(model.num_items)
    text = model.text_table()
    with_memory = F.normalize(model.adaptor(text) + model.memory.residual(index), dim=-1).detach()
    text_only = F.normalize(model.adaptor(text), dim=-1).detach()
    assert torch.equal(model.item_vectors(text, index), with_memory)  # eval mode: every residual, always

    model.train()
    torch.manual_seed(0)
    vectors = model.item_vectors(text, index).detach()
    kept = torch.isclose(vectors, with_memory, atol=1e-6).all(-1)
    dropped = torch.isclose(vectors, text_only, atol=1e-6).all(-1)
    assert bool((kept ^ dropped).all())  # each item has its whole residual or none of it
    assert 0.4 < float(dropped.float().mean()) < 0.6, float(dropped.float().mean())


def test_memory_dropout_must_be_a_share():
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="model.memory-dropout"):
            Config.from_run_config({**Config().to_flat(), "model.memory-dropout": bad})


def with_ids(cfg: Config) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, item_ids=True))


def test_item_ids_are_private_inform_the_user_and_are_never_scored(tiny_cfg, demo_dir):
    """``model.item-ids``: each item's private ID embedding (model.seq-dim wide) follows its vector in the
    table, enters the sequence encoder with the item, is never part of a score, never leaves the client,
    and is trained."""
    from client.training import train_round

    cfg = with_ids(tiny_cfg)
    data = prepare(load_scenario(demo_dir / "shop"), cfg)
    model = build_model(cfg, data)
    assert model.memory is not None and model.memory.ids is not None
    hidden, width, n = int(model.bert.config.hidden_size), cfg.model.seq_dim, model.num_items
    assert model.memory.ids.weight.shape == (n, width) and model.item_dim == hidden + width
    assert "memory.ids.weight" in private_state(model)
    assert not any("ids" in k for k in trainable_state(model))  # what a client sends
    table, bias = model.item_table()
    assert table.shape == (n, hidden + width)
    torch.testing.assert_close(table[:, hidden:], model.memory.ids.weight.detach(), rtol=0, atol=0)
    assert torch.equal(model.text_item_vectors(torch.ones(2, hidden))[:, hidden:], torch.zeros(2, width))

    history = torch.tensor([[-1, -1, -1, -1, -1, 3, 7, 11]])
    users = model.user_vectors(history, table)
    assert torch.equal(users[:, hidden:], torch.zeros(1, width))  # the ID part is never scored
    scores = model.scores(users, table, bias)
    changed = table.clone()
    changed[5, hidden:] += torch.randn(width)  # item 5's ID embedding (not in the history)
    torch.testing.assert_close(model.scores(users, changed, bias), scores, rtol=0, atol=0)

    before = model.memory.ids.weight.detach().clone()
    train_round(model, data, cfg, 1)
    assert not torch.equal(model.memory.ids.weight, before)
    table, bias = model.item_table()
    users = model.user_vectors(history, table)  # trained: the transformer's state now reaches the user
    changed = table.clone()
    changed[11, hidden:] += torch.randn(width)  # the last history item's ID embedding: the user changes
    assert not torch.allclose(model.user_vectors(history, changed), users)


def test_text_only_scenarios_get_no_id_embedding(tiny_cfg, demo_dir):
    """``model.text-only``: the items of the scenarios it names carry a zero ID part (their users are read from
    text alone, as without ``model.item-ids``), and their ID embeddings are never trained; other scenarios'
    items keep theirs (also in a pooled catalog)."""
    from client.training import train_round
    from simulations.references import pool

    cfg = with_ids(tiny_cfg)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_only="shop,news"))
    data = prepare(load_scenario(demo_dir / "shop"), cfg)
    model = build_model(cfg, data)
    hidden = int(model.bert.config.hidden_size)
    assert model.memory is not None and model.memory.ids is not None
    table, _ = model.item_table()
    assert torch.equal(table[:, hidden:], torch.zeros(model.num_items, cfg.model.seq_dim))
    before = model.memory.ids.weight.detach().clone()
    train_round(model, data, cfg, 1)
    assert torch.equal(model.memory.ids.weight, before)  # no gradient reaches a masked embedding
    pooled, offsets = pool([prepare(load_scenario(demo_dir / n), cfg) for n in ("shop", "video")])
    both = build_model(cfg, pooled)
    table, _ = both.item_table()
    shop, video = table[: offsets[1], hidden:], table[offsets[1] :, hidden:]
    assert torch.equal(shop, torch.zeros_like(shop)) and bool((video != 0).any())


def test_item_ids_need_the_item_memory_and_a_non_private_run():
    with pytest.raises(ValueError, match="model.item-ids.*needs model.item-memory"):
        Config.from_run_config({"model.item-ids": True, "model.item-memory": False})
    with pytest.raises(ValueError, match="model.item-ids.*non-private runs"):
        Config.from_run_config({"model.item-ids": True, "privacy.epsilon": 8.0})
