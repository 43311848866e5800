"""Shared fixtures: a tiny config-built BERT (no downloads) and the demo federation on disk."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel, BertTokenizer

from shared.config import Config
from shared.demo import BAD, DEMO_SCENARIOS, GENERIC, GOOD, TOPICS, write_demo_federation

# `make test` hands each module to one of two workers as a whole (`--dist loadfile`: a module's shared
# federation or service starts once) in collection order (`--no-loadscope-reorder`): the modules that take
# minutes go first, so the two workers finish close together
SLOW_FIRST = ("test_deployment.py", "test_simulation.py", "test_benchmark.py", "test_privacy.py", "test_loaders.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order within a module


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 3-layer, 32-wide BERT with a word-level vocabulary of the demo texts, saved to a folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    words = {w for ws in TOPICS.values() for w in ws} | set(GENERIC) | set(GOOD) | set(BAD)
    for spec in DEMO_SCENARIOS:
        words |= set(
            re.findall(
                r"[a-z]+", spec.template.replace("{words}", "").replace("{generic}", "").replace("{quality}", "")
            )
        )
    words = {p for w in words for p in re.split(r"[^a-z]+", w) if p}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "-", ":"] + sorted(words)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    write_demo_federation(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def service_cfg(tiny_encoder: str) -> Config:
    """Default config on the tiny encoder with a narrow head: what the service tests serve."""
    cfg = Config()
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, encoder=tiny_encoder, head_hidden=16, history=8)
    )


@pytest.fixture(scope="session")
def random_checkpoint():
    """``make(cfg, folder, seed)``: a checkpoint of a model with random adapters and head (a non-trivial model)."""
    import torch

    from shared.checkpoint import save_checkpoint
    from shared.model import RecModel
    from shared.records import trainable_state

    def make(cfg: Config, folder: Path, seed: int) -> Path:
        torch.manual_seed(seed)
        model = RecModel(cfg)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, 0, 0.2)
        return save_checkpoint(folder, 1, trainable_state(model), cfg, {})

    return make


@pytest.fixture(scope="session")
def tiny_cfg(tiny_encoder: str) -> Config:
    """Default config on the tiny encoder, with short rounds (frozen: tests derive theirs with replace)."""
    cfg = Config()
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, encoder=tiny_encoder, head_hidden=16, history=8),
        lora=dataclasses.replace(cfg.lora, rank=4, alpha=8),
        train=dataclasses.replace(cfg.train, local_steps=3, batch_size=8, threads=1),
    )


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Building Flower Messages outside a Flower process needs a task identity (run, node, task)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
