"""crossrec ClientApp: one client = one scenario. Unpack the message, call plain functions, pack the reply."""

from __future__ import annotations

import json
import logging
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
    PRIVACY_SPENT,
    from_arrayrecord,
    load_trainable,
    to_arrayrecord,
    trainable_state,
)

from .evaluation import PerUser, eval_file, evaluate, save_per_user
from .privacy import DPSGD, Ledger, ledger_path, open_ledger
from .state import PRIVATE_FILE, load_private, private_source, round_copy, save_private, state_folder
from .training import LocalData, build_model, prepare, shard, train_round

log = logging.getLogger("flwr").getChild("crossrec")  # shown with the client's Flower log lines
app = ClientApp()


def scenario_folder(cfg: Config, node_config: dict[str, bool | int | float | str]) -> Path:
    """Deployment: node config ``scenario`` + ``data-dir``; simulation: partition-id p -> the scenario
    ``data.scenarios[p // data.shards]`` (shard ``p % data.shards`` of its users: :func:`shard`)."""
    if "data-dir" in node_config:
        return Path(str(node_config["data-dir"]))
    names = cfg.data.scenario_names
    pid = int(node_config["partition-id"])
    if pid >= len(names) * cfg.data.shards:
        raise ValueError(
            f"partition-id {pid} has no scenario: data.scenarios = {cfg.data.scenarios!r}, "
            f"data.shards = {cfg.data.shards}"
        )
    if not cfg.data.dir:
        raise ValueError("config key 'data.dir' is empty: set it to the folder holding the scenario folders")
    return Path(cfg.data.dir) / names[pid // cfg.data.shards]


def setup(context: Context) -> tuple[Config, LocalData]:
    cfg = Config.from_run_config(context.run_config)
    scenario = load_scenario(scenario_folder(cfg, dict(context.node_config)), lenient=cfg.data.lenient)
    expected = context.node_config.get("scenario")
    if expected is not None and expected != scenario.name:
        raise ValueError(f"node config scenario={expected!r} but the data folder holds scenario {scenario.name!r}")
    data = prepare(scenario, cfg)
    if "data-dir" in context.node_config:
        return cfg, data
    return cfg, shard(data, int(context.node_config["partition-id"]) % cfg.data.shards, cfg.data.shards)


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


def private_path(cfg: Config, context: Context, data: LocalData) -> Path | None:
    """Where this client keeps its private state (item memory, personal modules); None when it has none."""
    if not cfg.model.item_memory and not cfg.fed.personal_modules:
        return None
    folder = state_folder(cfg, context.node_config, data.scenario.name)
    if folder is None:
        keys = [k for k, on in (("model.item-memory", cfg.model.item_memory), ("fed.personal", cfg.fed.personal)) if on]
        raise ValueError(
            f"{' and '.join(keys)} {'need' if len(keys) > 1 else 'needs'} a place for the client's private state: "
            "node config 'state-dir' (client daemon) or config key 'run.dir'"
        )
    return folder / PRIVATE_FILE


def client_model(cfg: Config, context: Context, data: LocalData, msg: Message, upto: int) -> RecModel:
    """The model with the global shared weights of ``msg`` and this client's private state (item memory,
    its own copies of the ``fed.personal`` modules) after round ``upto`` of this run (if kept)."""
    model = build_model(cfg, data)
    load_trainable(model, from_arrayrecord(msg.content.array_records[ARRAYS]))
    path = private_path(cfg, context, data)
    source = private_source(cfg, path, data.scenario.name, upto) if path is not None else None
    if source is not None:
        load_private(model, source, data.scenario.item_ids)
    return model


def behind_the_record(cfg: Config, ledger: Ledger, path: Path, record: dict[str, float] | None) -> str | None:
    """Why a private client must not train with this ledger: it records less epsilon spent than the server
    has on record for its scenario (a ledger lost, emptied, replaced by an older copy, or a resumed run
    that did not find its ledger), unless ``privacy.new-budget`` says a new budget is meant (logged)."""
    if record is None or ledger.epsilon() >= float(record["epsilon"]) - 1e-9:
        return None
    why = (
        f"privacy ledger {path} of scenario '{ledger.scenario}' records epsilon {ledger.epsilon():.3f} spent, but "
        f"the federation's checkpoints record {float(record['epsilon']):.3f}: the ledger is missing, emptied or "
        "older than the run; restore it (a deliberately new budget: a new state folder and privacy.new-budget = true)"
    )
    if cfg.privacy.new_budget:
        log.warning("privacy.new-budget = true, so training anyway: %s", why)
        return None
    return why


def keep_private(model: RecModel, path: Path | None, cfg: Config, data: LocalData, server_round: int) -> None:
    """After training: the private state as the latest file and as this run's copy of ``server_round``."""
    if path is not None:
        for target in (path, round_copy(path, cfg.run.dir, server_round)):
            save_private(model, target, data.scenario.name, data.scenario.item_ids)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global weights and this client's private state, train locally (DP-SGD when
    privacy.epsilon > 0), keep the private state on disk and reply with the shared weights only (and the
    round's training statistics; under DP only the epsilon and delta spent); a client whose privacy budget
    would be exceeded refuses and says why."""
    cfg, data = setup(context)
    server_round = cast(int, msg.content.config_records[CONFIG]["server-round"])
    path = private_path(cfg, context, data)
    if not cfg.privacy.enabled:
        model = client_model(cfg, context, data, msg, server_round - 1)
        stats = train_round(model, data, cfg, server_round)
        keep_private(model, path, cfg, data, server_round)
        return _reply(msg, data, stats, with_weights=model)
    ledger_file = ledger_path(cfg, context.node_config, data.scenario.name)
    ledger = open_ledger(cfg, ledger_file, data.scenario.name, len(data.scenario.users), len(data.trainable_users))
    spent = {"privacy.epsilon": ledger.epsilon(), "privacy.delta": ledger.delta}
    on_record = json.loads(str(msg.content.config_records[CONFIG].get(PRIVACY_SPENT, "{}")))
    refusal = behind_the_record(cfg, ledger, ledger_file, on_record.get(data.scenario.name)) or ledger.refusal(
        cfg.train.local_steps
    )
    if refusal is not None:
        return _reply(msg, data, spent, refused=refusal)
    model = client_model(cfg, context, data, msg, server_round - 1)
    if model.memory is not None and any(bool(p.detach().any()) for p in model.memory.parameters()):
        # DP-SGD holds the memory at its start (zero): values in it were fitted to user data without DP, and
        # every noised gradient would depend on them
        why = (
            f"the private item memory of scenario '{data.scenario.name}' in {path} was trained without DP: a "
            "private round on it would not be covered by epsilon; use a state folder without it"
        )
        return _reply(msg, data, spent, refused=why)
    stats = train_round(model, data, cfg, server_round, DPSGD(ledger, len(data.trainable_users)))
    ledger.record(cfg.train.local_steps, server_round)
    ledger.save(ledger_file)  # before the weights leave: a crash after this over-counts, never under-counts
    keep_private(model, path, cfg, data, server_round)  # personal modules trained under DP: their own copy
    spent = {"privacy.epsilon": ledger.epsilon(), "privacy.delta": ledger.delta}
    # the round's losses and counts are computed on the sampled users' data outside DP-SGD: they stay in
    # this client's log, and the reply carries the noised weights and the ledger's figures only
    log.info("%s round %d (not sent): %s", data.scenario.name, server_round, json.dumps(stats))
    return _reply(msg, data, spent, with_weights=model)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Full-ranking metrics of the global weights (with this client's private state) on this scenario's
    validation and test splits. Each test user's values stay on the client: in its state folder
    (``eval/round-NNNN.npz``), where a benchmark run on one machine reads them for paired intervals."""
    cfg, data = setup(context)
    server_round = cast(int, msg.content.config_records[CONFIG]["server-round"])
    model = client_model(cfg, context, data, msg, server_round)
    per_user: PerUser = {}
    metrics = evaluate(model, data, cfg, per_user=per_user)
    folder = state_folder(cfg, context.node_config, data.scenario.name)
    if folder is not None:
        save_per_user(eval_file(folder, server_round), per_user)
    return _reply(msg, data, metrics)
