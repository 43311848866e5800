import dataclasses

import pytest
import torch
import torch.nn.functional as F

from client.training import build_model, prepare, train_round
from shared.data import load_scenario
from shared.model import RecModel, full_encoder_items, load_pretrained
from shared.records import trainable_state


def mean_pool(model, texts, cfg):
    tokenizer, base = load_pretrained(cfg.model.encoder)
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=cfg.model.max_length, return_tensors="pt")
    hidden = base(**tokens).last_hidden_state
    w = tokens["attention_mask"][..., None].float()
    return F.normalize((hidden * w).sum(1) / w.sum(1), dim=-1)


TEXTS = ["hiking tent trail for sale", "news story: jazz album report", "video: superb film about rocket orbit"]


@torch.no_grad()
def test_lora_at_init_equals_the_frozen_model(tiny_cfg):
    model = RecModel(tiny_cfg)
    assert torch.equal(full_encoder_items(model, TEXTS), mean_pool(model, TEXTS, tiny_cfg))


@torch.no_grad()
def test_cached_prefix_forward_equals_full_forward(tiny_cfg, demo_dir):
    data = prepare(load_scenario(demo_dir / "shop"), tiny_cfg)
    model = build_model(tiny_cfg, data)
    for p in model.encoder.parameters():  # non-zero LoRA so the top layers really differ from the base
        if p.requires_grad:
            p.normal_(0, 0.5)
    index = torch.arange(0, 40)
    cached = model.encode_items(index)
    full = full_encoder_items(model, [data.scenario.texts[i] for i in index])
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached, mean_pool(model, [data.scenario.texts[i] for i in index], tiny_cfg), atol=1e-3)


@torch.no_grad()
def test_packed_rows_of_items_equal_items_encoded_one_by_one(tiny_cfg, demo_dir):
    """(B, C) packing with block-diagonal attention: the same vectors as C separate items."""
    data = prepare(load_scenario(demo_dir / "news"), tiny_cfg)
    model = build_model(tiny_cfg, data)
    for p in model.encoder.parameters():
        if p.requires_grad:
            p.normal_(0, 0.5)
    index = torch.randint(model.num_items, (5, 7), generator=torch.Generator().manual_seed(0))
    packed = model.encode_items(index)
    assert packed.shape == (5, 7, 32)
    one_by_one = torch.cat([model.encode_items(torch.tensor([i])) for i in index.reshape(-1).tolist()])
    torch.testing.assert_close(packed, one_by_one.reshape(5, 7, 32), atol=1e-5, rtol=1e-5)
    full = full_encoder_items(model, [data.scenario.texts[i] for i in index[2].tolist()])
    torch.testing.assert_close(packed[2], full, atol=1e-5, rtol=1e-5)


def test_only_adapters_text_adaptor_user_model_and_head_are_trainable(tiny_cfg):
    model = RecModel(tiny_cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(("lora_" in n) or n.startswith(("adaptor.", "user.", "head.")) for n in names)
    assert {"adaptor.weight", "adaptor.bias"} <= set(names)
    lora = [n for n in names if "lora_" in n]
    top = {str(i) for i in range(3 - tiny_cfg.lora.layers, 3)}
    assert {n.split(".layer.")[1].split(".")[0] for n in lora} == top  # only the top layers
    assert {n.split(".")[-4] for n in lora} == {"query", "value"}
    # a catalog brings the private memory: trainable, never among the shared (sent) weights
    model.attach_catalog(TEXTS)
    private = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("memory.")]
    assert private == ["memory.repeat", "memory.residual.weight", "memory.bias.weight"]
    assert set(trainable_state(model)) == set(names)


def test_training_moves_trainables_and_leaves_frozen_weights_bit_identical(tiny_cfg, demo_dir):
    data = prepare(load_scenario(demo_dir / "video"), tiny_cfg)
    model = build_model(tiny_cfg, data)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = train_round(model, data, tiny_cfg, server_round=1)
    assert stats["loss"] > 0
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    moved = [n for n, v in trainable.items() if not torch.equal(after[n], v)]
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    assert any(n.startswith("head.towers.0") for n in moved)  # the satisfaction objective (MMoE tower 0) trains too
    assert any(n.startswith("user.") for n in moved) and any(n.startswith("memory.") for n in moved)
    assert "adaptor.weight" in moved


def test_fresh_items_go_through_lora_on_every_nth_step_only(tiny_cfg, demo_dir, monkeypatch):
    """``train.fresh-every = 3`` over 7 steps: fresh items (an encoding with a gradient) on steps 0, 3, 6;
    the steps between still move everything but LoRA."""
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, local_steps=7, fresh_every=3))
    data = prepare(load_scenario(demo_dir / "video"), cfg)
    model = build_model(cfg, data)
    real, calls = model.encode_items, []

    def spy(index):
        calls.append(torch.is_grad_enabled())
        return real(index)

    monkeypatch.setattr(model, "encode_items", spy)
    train_round(model, data, cfg, server_round=1)
    assert calls.count(True) == 3

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_steps=2, fresh_every=2))
    model = build_model(cfg, data)
    steps = []
    real_step = torch.optim.AdamW.step

    def record(optimizer, *args, **kwargs):  # which parameters had a gradient at each step
        steps.append({n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum())})
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    train_round(model, data, cfg, server_round=1)
    assert any("lora_" in n for n in steps[0]) and not any("lora_" in n for n in steps[1])
    assert {"user.out.weight", "memory.residual.weight", "adaptor.weight"} <= steps[1]


@torch.no_grad()
def test_text_adaptor_starts_as_identity_and_maps_every_item(tiny_cfg, demo_dir):
    """At initialisation the adaptor changes nothing (item vectors = the text vectors: the zero-shot model);
    a changed adaptor changes every item vector, fresh or from the table, in the same way."""
    data = prepare(load_scenario(demo_dir / "shop"), tiny_cfg)
    model = build_model(tiny_cfg, data)
    text = model.text_table()
    vectors, _ = model.item_table()
    torch.testing.assert_close(vectors, text, atol=1e-6, rtol=0)
    assert model.adaptor is not None
    model.adaptor.weight.normal_(0, 0.3)
    index = torch.arange(10)
    mapped = model.item_vectors(model.encode_items(index), index)
    expected = F.normalize(text[:10] @ model.adaptor.weight.T + model.adaptor.bias, dim=-1)
    torch.testing.assert_close(mapped, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.item_table()[0][:10], expected, atol=1e-5, rtol=1e-5)
    off = RecModel(dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, text_adaptor=False)))
    assert off.adaptor is None and not any(n.startswith("adaptor.") for n, _ in off.named_parameters())


def test_objective_without_labels_keeps_its_parameters_in_the_backward_pass(tiny_cfg, demo_dir):
    data = prepare(load_scenario(demo_dir / "news"), tiny_cfg)  # news has no satisfaction labels
    model = build_model(tiny_cfg, data)
    train_round(model, data, tiny_cfg, server_round=1)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["head.towers.0.weight"] is not None  # in the graph (with a zero-weighted loss)


def test_lora_layers_beyond_depth_is_a_clear_error(tiny_cfg):
    bad = dataclasses.replace(tiny_cfg, lora=dataclasses.replace(tiny_cfg.lora, layers=9))
    with pytest.raises(ValueError, match="'lora.layers' = 9: the encoder has only 3 layers"):
        RecModel(bad)


def test_empty_history_is_a_clear_error(tiny_cfg, demo_dir):
    data = prepare(load_scenario(demo_dir / "shop"), tiny_cfg)
    model = build_model(tiny_cfg, data)
    with pytest.raises(ValueError, match="at least one history item"):
        model.user_vectors(torch.full((2, 4), -1), model.item_table())


@pytest.mark.integration
@torch.no_grad()
def test_real_minilm_lora_at_init_equals_sentence_embedding():
    from shared.config import Config

    cfg = Config()
    model = RecModel(cfg)
    assert torch.equal(full_encoder_items(model, TEXTS), mean_pool(model, TEXTS, cfg))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 24_576  # q,v of layers 4-5, r=8


def _count_and_return(folder: str) -> dict[str, torch.Tensor]:
    import os
    import time

    with open(os.path.join(folder, "computed"), "a") as fh:  # one line per computation
        fh.write(f"{os.getpid()}\n")
    time.sleep(0.5)  # long enough for the other process to reach the lock
    return {"x": torch.arange(6.0).reshape(2, 3)}


def _cached_in_child(folder: str, queue) -> None:  # type: ignore[no-untyped-def]
    from shared.model import disk_cached

    queue.put(disk_cached(folder, "key", lambda: _count_and_return(folder))["x"].tolist())


def test_disk_cache_is_computed_once_by_one_of_two_processes(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_cached_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got == [[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]] * 2
    assert len((tmp_path / "computed").read_text().splitlines()) == 1  # the other process waited and read it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["computed", "key.lock", "key.safetensors"]  # no temp left
    (tmp_path / "key.safetensors").write_bytes(b"not a tensor file")
    from shared.model import disk_cached

    with pytest.raises(RuntimeError, match="key.safetensors is unreadable.*delete it"):
        disk_cached(str(tmp_path), "key", lambda: _count_and_return(str(tmp_path)))


@torch.no_grad()
def test_cached_prefix_and_text_table_read_back_exactly_and_catalog_parts_share_them(tiny_cfg, demo_dir, tmp_path):
    """With run.cache-dir the frozen prefix and the text tables are computed once for every process of a
    run: read back (a new process: in-memory caches cleared) they are bit-identical; a pooled catalog given
    as parts reads each part's prefix from the same files (equal to the pooled catalog's own prefix up to
    float rounding: texts are batched by length, and other batches round differently)."""
    from shared import model as model_module
    from shared.model import frozen_prefix

    cfg = dataclasses.replace(tiny_cfg, run=dataclasses.replace(tiny_cfg.run, cache_dir=str(tmp_path / "cache")))
    shop, news = (prepare(load_scenario(demo_dir / name), cfg) for name in ("shop", "news"))
    frozen_prefix.cache_clear()
    model_module._TEXT_TABLES.clear()  # other tests' tables of the same catalog and adapters
    first = build_model(cfg, shop)
    table = first.text_table().clone()
    files = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.safetensors"))
    assert files == ["prefix", "table"]
    frozen_prefix.cache_clear()
    model_module._TEXT_TABLES.clear()
    again = build_model(cfg, shop)
    assert again._prefix is not first._prefix and torch.equal(again._prefix, first._prefix)
    assert torch.equal(again.text_table(), table)
    frozen_prefix.cache_clear()
    uncached = build_model(tiny_cfg, shop)  # no cache dir: computed here, the same values
    assert torch.equal(uncached._prefix, first._prefix) and torch.equal(uncached._mask, first._mask)

    texts = shop.scenario.texts + news.scenario.texts
    n = len(shop.scenario.texts)
    pooled = RecModel(cfg)
    pooled.attach_catalog(texts, [(0, n), (n, len(texts))])
    assert len(list((tmp_path / "cache").glob("prefix-*.safetensors"))) == 2  # shop's, then news's: no pooled file
    whole = RecModel(tiny_cfg)
    whole.attach_catalog(texts)
    assert torch.equal(pooled._mask, whole._mask)  # real tokens' states: equal up to the batches' float rounding
    real = whole._mask[..., None].bool()  # (padding states depend on the batch and are masked everywhere)
    torch.testing.assert_close(pooled._prefix * real, whole._prefix * real, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"catalog parts \[\(0, 5\), \(6, 540\)\] do not cover the 540 items"):
        pooled.attach_catalog(texts, [(0, 5), (6, len(texts))])
