import dataclasses
import hashlib
import json

import numpy as np
import pytest

from shared.checkpoint import (
    chosen_checkpoint,
    export_adapter,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from shared.config import Config


def test_checkpoint_round_trips_exactly(tmp_path):
    cfg = Config()
    arrays = {"a": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.float32)}
    folder = save_checkpoint(tmp_path, 3, arrays, cfg, {"metrics": {"shop": {"valid": {"ndcg@10": 0.5}}}})
    assert folder.name == "round-0003" and latest_checkpoint(tmp_path) == folder
    done, loaded, meta = load_checkpoint(folder, cfg)
    assert done == 3 and loaded.keys() == arrays.keys()
    assert all(np.array_equal(loaded[k], arrays[k]) and loaded[k].dtype == arrays[k].dtype for k in arrays)
    assert meta["config"] == cfg.to_flat() and meta["metrics"]["shop"]["valid"]["ndcg@10"] == 0.5
    assert json.loads((folder / "meta.json").read_text())["round"] == 3
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-0003"]  # no temp folder left


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    cfg = Config()
    folder = save_checkpoint(tmp_path, 1, {"a": np.zeros(2, np.float32)}, cfg, {})
    other = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=4))
    with pytest.raises(ValueError, match="different model"):
        load_checkpoint(folder, other)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path, cfg)


def test_a_checkpoint_written_before_a_later_model_key_existed_still_loads(tmp_path):
    """A checkpoint's meta.json from before model.item-ids existed (no such key; its hash over the keys it had)
    reads with the key at its default; the same checkpoint with the key on is another model."""
    cfg = Config()
    folder = save_checkpoint(tmp_path, 1, {"a": np.zeros(2, np.float32)}, cfg, {})
    meta = json.loads((folder / "meta.json").read_text())
    del meta["config"]["model.item-ids"], meta["config"]["model.text-only"], meta["config"]["model.repeat-logit"]
    shapes = {k: v for k, v in meta["config"].items() if k.startswith(("model.", "lora."))}
    meta["model_hash"] = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]  # as written then
    (folder / "meta.json").write_text(json.dumps(meta))
    loaded, _, _ = read_checkpoint(folder)
    assert loaded.model.item_ids is False and loaded.model_hash() == meta["model_hash"]
    assert loaded.model.repeat_logit is False  # the model it was: no repeat logit in its private state either
    meta["config"]["model.item-ids"] = False  # written while the key was hashed at its default too: loads
    hashed = {**shapes, "model.item-ids": False}
    meta["model_hash"] = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]
    (folder / "meta.json").write_text(json.dumps(meta))
    assert read_checkpoint(folder)[0].model.item_ids is False
    with_ids = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, item_ids=True, item_memory=True))
    assert with_ids.model_hash() != cfg.model_hash()
    no_repeat = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, repeat_logit=False))
    assert no_repeat.model_hash() != cfg.model_hash()  # the default (on) is another model than the old one


def test_failed_write_leaves_the_previous_checkpoint(tmp_path):
    cfg = Config()
    save_checkpoint(tmp_path, 1, {"a": np.ones(2, np.float32)}, cfg, {})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, {"a": np.zeros(2, np.float32)}, cfg, {"bad": object()})  # not JSON
    _, loaded, _ = load_checkpoint(tmp_path / "checkpoints" / "round-0001", cfg)
    assert np.array_equal(loaded["a"], np.ones(2, np.float32))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-0001"]


def test_a_run_folder_reads_as_the_round_chosen_on_validation(tmp_path):
    """Round 2 has the best mean of each scenario's validation metric relative to its best round (news
    by AUC, shop by NDCG@10), round 3 is the latest: the run folder means round 2, round 3 stays reachable."""
    cfg = Config()
    valid = {1: (0.60, 0.040), 2: (0.66, 0.050), 3: (0.67, 0.030)}
    for r, (auc, ndcg) in valid.items():
        metrics = {"news": {"valid": {"auc": auc}, "test": {}}, "shop": {"valid": {"ndcg@10": ndcg}, "test": {}}}
        save_checkpoint(tmp_path, r, {"a": np.full(2, r, np.float32)}, cfg, {"metrics": metrics})
    assert chosen_checkpoint(tmp_path) == tmp_path / "checkpoints/round-0002"
    _, folder, weights = read_checkpoint(tmp_path)
    assert folder.name == "round-0002" and weights["a"][0] == 2
    _, folder, weights = read_checkpoint(tmp_path / "checkpoints/round-0003")
    assert folder.name == "round-0003" and weights["a"][0] == 3
    # checkpoints without validation metrics (no evaluation): the latest
    other = tmp_path / "other"
    for r in (1, 2):
        save_checkpoint(other, r, {"a": np.full(2, r, np.float32)}, cfg, {})
    assert read_checkpoint(other)[1].name == "round-0002"
    with pytest.raises(ValueError, match="neither a checkpoint folder, an adapter export nor a run folder"):
        read_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa"])
def test_the_adapter_export_loads_elsewhere_in_peft_and_serves_alone(tiny_cfg, demo_dir, tmp_path, aggregation):
    """Exported, moved to another folder: peft loads it on a fresh base model and reproduces crossrec's item
    vectors (with the text adaptor from crossrec_head.safetensors), and the service serves from it alone
    exactly what it serves from the checkpoint."""
    import shutil

    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from client.serving import Recommender, Request
    from client.training import build_model, prepare
    from shared.data import load_scenario
    from shared.model import mean_pool
    from shared.records import trainable_state

    cfg = dataclasses.replace(tiny_cfg, fed=dataclasses.replace(tiny_cfg.fed, aggregation=aggregation))
    data = prepare(load_scenario(demo_dir / "video"), cfg)
    model = build_model(cfg, data)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # a trained-looking shared model (the private memory stays zero)
            if p.requires_grad and not p.shape == model.memory.residual.weight.shape:
                p.add_(0.1 * torch.randn_like(p))
    run = tmp_path / "run"
    checkpoint = save_checkpoint(run, 2, trainable_state(model), cfg, {})
    export_adapter(model, run / "adapter", 2)
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(run / "adapter", moved)
    peft_config = json.loads((moved / "adapter_config.json").read_text())
    assert peft_config["task_type"] == "FEATURE_EXTRACTION"
    assert peft_config["base_model_name_or_path"] == cfg.model.encoder  # the packaged default: its hub id
    meta = json.loads((moved / "crossrec_config.json").read_text())
    assert meta["round"] == 2 and meta["config"]["fed.aggregation"] == aggregation
    assert not any(k.startswith("memory.") for k in meta["shapes"])

    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(cfg.model.encoder), str(moved)).eval()
    head = load_file(str(moved / "crossrec_head.safetensors"))
    texts = data.scenario.texts[:6]
    tokens = AutoTokenizer.from_pretrained(cfg.model.encoder)(
        texts, padding=True, truncation=True, max_length=cfg.model.max_length, return_tensors="pt"
    )
    with torch.no_grad():
        text = mean_pool(loaded(**tokens).last_hidden_state, tokens["attention_mask"])
        theirs = F.normalize(text @ head["adaptor.weight"].T + head["adaptor.bias"], dim=-1)
        index = torch.arange(6)
        ours = model.item_vectors(model.encode_catalog(index), index)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    _, folder, weights = read_checkpoint(moved)
    original = trainable_state(model)
    assert folder == moved and weights.keys() == original.keys()
    assert all(np.array_equal(weights[k], original[k]) for k in original)
    request = Request(scenario="video", user_id="video-user-0004", k=10)
    from_export = Recommender(moved, [demo_dir / "video"]).recommend(request)
    assert from_export == Recommender(checkpoint, [demo_dir / "video"]).recommend(request)
