"""crossrec ClientApp: one client = one scenario. Unpack the message, call plain functions, pack the reply."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.config import Config
from shared.data import load_scenario
from shared.model import RecModel
from shared.records import (
    ARRAYS,
    CONFIG,
    INFO,
    METRICS,
    NUM_EXAMPLES,
    from_arrayrecord,
    load_trainable,
    to_arrayrecord,
    trainable_state,
)

from .evaluation import evaluate
from .privacy import DPSGD, ledger_path, open_ledger
from .training import LocalData, build_model, prepare, train_round

app = ClientApp()


def scenario_folder(cfg: Config, node_config: dict[str, bool | int | float | str]) -> Path:
    """Deployment: node config ``scenario`` + ``data-dir``; simulation: partition-id -> ``data.scenarios``."""
    if "data-dir" in node_config:
        return Path(str(node_config["data-dir"]))
    names = cfg.data.scenario_names
    pid = int(node_config["partition-id"])
    if pid >= len(names):
        raise ValueError(f"partition-id {pid} has no scenario: data.scenarios = {cfg.data.scenarios!r}")
    if not cfg.data.dir:
        raise ValueError("config key 'data.dir' is empty: set it to the folder holding the scenario folders")
    return Path(cfg.data.dir) / names[pid]


def setup(context: Context) -> tuple[Config, LocalData]:
    cfg = Config.from_run_config(context.run_config)
    scenario = load_scenario(scenario_folder(cfg, dict(context.node_config)), lenient=cfg.data.lenient)
    expected = context.node_config.get("scenario")
    if expected is not None and expected != scenario.name:
        raise ValueError(f"node config scenario={expected!r} but the data folder holds scenario {scenario.name!r}")
    return cfg, prepare(scenario, cfg)


def _reply(
    msg: Message,
    data: LocalData,
    metrics: dict[str, float],
    with_weights: RecModel | None = None,
    refused: str | None = None,
) -> Message:
    info: dict[str, str] = {"scenario": data.scenario.name} | ({"refused": refused} if refused else {})
    content = RecordDict(
        {
            METRICS: MetricRecord({**metrics, NUM_EXAMPLES: data.num_examples}),
            INFO: ConfigRecord(info),  # type: ignore[arg-type]
        }
    )
    if with_weights is not None:
        content[ARRAYS] = to_arrayrecord(trainable_state(with_weights))
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global weights, train locally (DP-SGD when privacy.epsilon > 0), reply with the trainable
    weights only; a client whose privacy budget would be exceeded refuses and says why."""
    cfg, data = setup(context)
    server_round = cast(int, msg.content.config_records[CONFIG]["server-round"])
    if not cfg.privacy.enabled:
        model = build_model(cfg, data)
        load_trainable(model, from_arrayrecord(msg.content.array_records[ARRAYS]))
        return _reply(msg, data, train_round(model, data, cfg, server_round), with_weights=model)
    path = ledger_path(cfg, context.node_config, data.scenario.name)
    ledger = open_ledger(cfg, path, data.scenario.name, len(data.scenario.users), len(data.trainable_users))
    spent = {"privacy.epsilon": ledger.epsilon(), "privacy.delta": ledger.delta}
    refusal = ledger.refusal(cfg.train.local_steps)
    if refusal is not None:
        return _reply(msg, data, spent, refused=refusal)
    model = build_model(cfg, data)
    load_trainable(model, from_arrayrecord(msg.content.array_records[ARRAYS]))
    stats = train_round(model, data, cfg, server_round, DPSGD(ledger, len(data.trainable_users)))
    ledger.record(cfg.train.local_steps, server_round)
    ledger.save(path)  # before the weights leave: a crash after this over-counts, never under-counts
    spent = {"privacy.epsilon": ledger.epsilon(), "privacy.delta": ledger.delta}
    return _reply(msg, data, {**stats, **spent}, with_weights=model)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Full-ranking metrics of the global weights on this scenario's validation and test splits."""
    cfg, data = setup(context)
    model = build_model(cfg, data)
    load_trainable(model, from_arrayrecord(msg.content.array_records[ARRAYS]))
    return _reply(msg, data, evaluate(model, data, cfg))
