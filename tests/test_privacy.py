"""User-level DP-SGD: accounting, the ledger across rounds and restarts, refusal, per-user gradients."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from client.app import train
from client.privacy import DPSGD, LEDGER, Ledger, epsilon_of, ledger_path, ledger_status, open_ledger, plan
from client.training import Batch, build_model, loss_fn, make_batch, prepare, sample_users, train_round
from server.rounds import initial_weights
from server.strategy import CrossrecFedAvg, expected_from
from shared.config import Config
from shared.data import load_scenario
from shared.model import ADAPTER_MARK, PRIVATE_PREFIX
from shared.records import ARRAYS, CONFIG, INFO, METRICS, NUM_EXAMPLES, PRIVACY_SPENT, shared_parameters, to_arrayrecord

pytestmark = pytest.mark.privacy


def private(cfg: Config, epsilon: float = 8.0, **train) -> Config:
    return dataclasses.replace(
        cfg,
        privacy=dataclasses.replace(cfg.privacy, epsilon=epsilon),
        train=dataclasses.replace(cfg.train, **train),
    )


def test_epsilon_for_known_settings_matches_opacus_accountant():
    # q = 0.01, sigma = 1.0, 1000 steps, delta = 1e-5: Opacus RDP accountant gives 2.1014
    assert epsilon_of([(1.0, 0.01, 1000)], 1e-5) == pytest.approx(2.1013652716430564, abs=1e-9)
    accountant = RDPAccountant()
    for _ in range(1000):
        accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    assert epsilon_of([(1.0, 0.01, 1000)], 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), abs=1e-12)
    assert epsilon_of([(0.5, 0.1, 50)], 1e-4) == pytest.approx(22.4615, abs=1e-4)
    assert epsilon_of([], 1e-5) == 0.0


def test_two_rounds_of_k_steps_equal_one_run_of_2k_steps(tiny_cfg):
    cfg = private(tiny_cfg)
    rounds = plan(cfg, "video", num_users=500, trainable_users=400)
    rounds.record(7, server_round=1)
    rounds.record(7, server_round=2)
    once = plan(cfg, "video", num_users=500, trainable_users=400)
    once.record(14, server_round=1)
    assert rounds.steps == once.steps == 14
    assert rounds.epsilon() == pytest.approx(once.epsilon(), rel=1e-12)
    assert rounds.epsilon() == pytest.approx(rounds.epsilon(0), rel=1e-12)


def test_plan_spends_exactly_the_budget_over_the_planned_run(tiny_cfg):
    cfg = private(tiny_cfg, epsilon=4.0)
    ledger = plan(cfg, "shop", num_users=1000, trainable_users=800)
    assert ledger.delta == pytest.approx(1e-4)  # 1 / (10 x users)
    assert ledger.sample_rate == pytest.approx(tiny_cfg.train.batch_size / 800)
    assert ledger.planned_steps == tiny_cfg.fed.rounds * tiny_cfg.train.local_steps
    assert 3.9 <= ledger.epsilon(ledger.planned_steps) <= 4.0  # Opacus tolerance 0.01 below the target
    assert ledger.refusal(ledger.planned_steps) is None
    assert "exhausted" in str(ledger.refusal(ledger.planned_steps + 1))


def test_dp_round_moves_lora_weights_and_records_nothing_itself(tiny_cfg, demo_dir):
    cfg = private(tiny_cfg)
    data = prepare(load_scenario(demo_dir / "video"), cfg)
    model = build_model(cfg, data)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ledger = plan(cfg, "video", len(data.scenario.users), len(data.trainable_users))
    stats = train_round(model, data, cfg, 1, DPSGD(ledger, len(data.trainable_users)))
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    table = [n for n in before if n.startswith((PRIVATE_PREFIX, "adaptor."))]  # act on the whole catalog
    shared = [n for n in before if n not in table]
    assert lora and all(not torch.equal(after[n], before[n]) for n in lora)
    assert all(not torch.equal(after[n], before[n]) for n in shared)  # noise reaches every other weight
    assert {n.split(".")[0] for n in table} == {"memory", "adaptor"}
    assert all(torch.equal(after[n], before[n]) for n in table)  # memory and adaptor are frozen under DP
    assert all(after[n].requires_grad for n in table)  # and trainable again after the round
    assert stats["loss"] > 0 and ledger.steps == 0
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_clipped_noiseless_dp_steps_lower_the_loss_through_lora(tiny_cfg, demo_dir):
    """Noise 0 makes DP-SGD clipped SGD: the loss on a fixed batch must fall, with LoRA alone trainable (its
    gradient comes from the fresh items' softmax; the full-catalog term reads the round's text table)."""
    cfg = private(tiny_cfg, local_steps=15, fresh_items=4)  # under DP a user's softmax is over its own fresh items
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seq_dropout=0.0))  # deterministic
    data = prepare(load_scenario(demo_dir / "shop"), cfg)
    model = build_model(cfg, data)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    text = model.text_table()
    rng = np.random.default_rng(0)
    users = sample_users(data, cfg, rng, poisson=False)
    batch = make_batch(data, cfg, users, model.num_items, rng, per_user=True)
    ledger = dataclasses.replace(plan(cfg, "shop", 360, 360), noise_multiplier=0.0, max_grad_norm=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()  # per-sample hooks need training mode; no dropout: the loss is a function of the weights

    def loss(table: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            total, parts = loss_fn(model, batch, table, 0.5, shared=False)
            return float(total), parts["loss_fresh"]

    first, first_fresh = loss(text)
    with DPSGD(ledger, 360).attached(model, torch.optim.SGD(params, lr=5.0)) as optimizer:
        for _ in range(cfg.train.local_steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, batch, text, 0.5, shared=False)[0].backward()
            optimizer.step()
    last, last_fresh = loss(text)  # the objective the steps minimised (measured: 7.29 -> 7.06)
    assert last < first - 0.1 and last_fresh < first_fresh - 0.05
    assert loss(model.text_table())[0] < first - 0.03  # a refreshed table lowers the full softmax too (7.22)


def test_per_example_gradient_is_the_gradient_of_that_user_alone(tiny_cfg, demo_dir):
    """The unit of privacy: user b's per-sample gradient (its whole sequence: every position, its own fresh
    items, the aux objective) equals the gradient of b's loss computed alone, for every shared trainable
    parameter (LoRA, sequence encoder, head); the private memory and the text adaptor take part in the loss
    but are frozen."""
    cfg = dataclasses.replace(
        tiny_cfg,
        model=dataclasses.replace(tiny_cfg.model, seq_dropout=0.0, memory_dropout=0.0),  # training mode, deterministic
        train=dataclasses.replace(tiny_cfg.train, fresh_items=3),
    )
    data = prepare(load_scenario(demo_dir / "shop"), cfg)
    model = build_model(cfg, data)
    assert model.memory is not None
    with torch.no_grad():  # a non-zero memory, and a non-zero output layer, so every part is exercised
        model.memory.residual.weight.normal_(0, 0.3)
        model.memory.bias.weight.normal_(0, 1.0)
        model.user.out.weight.normal_(0, 0.1)
        for name, p in model.encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    for part in model.catalog_parts():  # as train_round does under DP: memory and text adaptor frozen
        part.requires_grad_(False)
    text = model.text_table()
    rng = np.random.default_rng(3)
    users = sample_users(data, cfg, rng, poisson=False)[:6]
    batch = make_batch(data, cfg, users, model.num_items, rng, per_user=True)
    assert int((batch.seq >= 0).sum(1).min()) < batch.seq.shape[1]  # some sequences are left-padded
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith((PRIVATE_PREFIX, "adaptor.")) for n in params)
    assert any("lora_" in n for n in params) and any(n.startswith("user.") for n in params)
    model.train()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    loss_fn(model, batch, text, 0.5, shared=False)[0].backward()
    per_sample = {n: p.grad_sample.clone() for n, p in params.items()}
    wrapped._close()
    assert all(g.shape[0] == len(users) for g in per_sample.values())
    for b in range(len(users)):
        model.zero_grad(set_to_none=True)
        one = slice(b, b + 1)
        alone = Batch(batch.seq[one], batch.labels[one], batch.fresh[one])
        loss_fn(model, alone, text, 0.5, shared=False)[0].backward()
        for n, p in params.items():
            assert p.grad is not None, n
            torch.testing.assert_close(per_sample[n][b], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    moved = [n for n in params if per_sample[n].abs().sum() > 0]
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    assert any(n.startswith("user.blocks") for n in moved) and "head.similarity.weight" in moved


def test_lora_learns_from_each_users_own_loss_with_the_default_fresh_items(tiny_cfg, demo_dir):
    """Under DP a user's fresh-item softmax is over its own fresh items only, and it is the adapters' only
    gradient (the full-catalog term reads a table without one): with one fresh item per user that softmax
    has a single candidate, its loss is 0 and DP-SGD would move the adapters by noise alone. DP batches
    (``per_user``) take at least two, whatever ``train.fresh-items`` (> 0) says."""
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, seq_dropout=0.0))
    data = prepare(load_scenario(demo_dir / "shop"), cfg)
    model = build_model(cfg, data)
    text = model.text_table()
    model.train()
    users = sample_users(data, cfg, np.random.default_rng(0), poisson=False)
    for fresh in (cfg.train.fresh_items, 1):  # the default, and the smallest setting
        rng = np.random.default_rng(0)
        batch = make_batch(data, with_fresh(cfg, fresh), users, model.num_items, rng, per_user=True)
        assert batch.fresh.shape == (len(users), max(2, fresh))
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch, text, 0.5, shared=False)[0].backward()
        lora_b = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # (lora_A's is 0 while B = 0)
        assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b), f"train.fresh-items = {fresh}"
    single = make_batch(data, with_fresh(cfg, 1), users, model.num_items, np.random.default_rng(0))
    assert single.fresh.shape == (len(users), 1)  # shared candidates (no DP): one per user is enough
    model.zero_grad(set_to_none=True)
    loss_fn(model, single, text, 0.5, shared=False)[0].backward()  # what per_user avoids: no adapter gradient
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters() if "lora_" in n)


def with_fresh(cfg: Config, fresh: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fresh_items=fresh))


def test_empty_poisson_batches_are_noise_only_steps(tiny_cfg, demo_dir):
    cfg = private(tiny_cfg, batch_size=1, local_steps=12)  # rate 1/360: about a third of the steps sample nobody
    data = prepare(load_scenario(demo_dir / "news"), cfg)
    rng = np.random.default_rng(0)
    assert sum(len(sample_users(data, cfg, rng, poisson=True)) == 0 for _ in range(12)) >= 3
    model = build_model(cfg, data)
    before = dict(shared_parameters(model))
    before = {n: p.detach().clone() for n, p in before.items()}
    train_round(model, data, cfg, 1, DPSGD(plan(cfg, "news", 360, 360), 360))
    frozen = {n for n, _ in model.named_parameters() if n.startswith("adaptor.")}  # a catalog part: frozen under DP
    assert frozen and all(torch.equal(p, before[n]) for n, p in shared_parameters(model).items() if n in frozen)
    assert all(not torch.equal(p, before[n]) for n, p in shared_parameters(model).items() if n not in frozen)


def test_a_failed_private_round_leaves_the_catalog_parts_trainable(tiny_cfg, demo_dir, monkeypatch):
    """DP-SGD freezes the item memory and text adaptor for the round; an error in a step must not leave
    them frozen for the process's next (non-private) round or leave the model in training mode."""
    import client.training as training

    cfg = private(tiny_cfg, batch_size=8, local_steps=3)
    data = prepare(load_scenario(demo_dir / "news"), cfg)
    model = build_model(cfg, data)

    def broken(*args, **kwargs):
        raise RuntimeError("a step failed")

    monkeypatch.setattr(training, "loss_fn", broken)
    with pytest.raises(RuntimeError, match="a step failed"):
        train_round(model, data, cfg, 1, DPSGD(plan(cfg, "news", 360, 360), 360))
    parts = [p for part in model.catalog_parts() for p in part.parameters()]
    assert parts and all(p.requires_grad for p in parts)
    assert not model.training


def _context(cfg: Config, demo_dir, scenario: str, state_dir) -> Context:
    node: dict[str, bool | float | int | str] = {
        "scenario": scenario,
        "data-dir": str(demo_dir / scenario),
        "state-dir": str(state_dir),
    }
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=cfg.to_flat())


def _train_message(cfg: Config, server_round: int, on_record: dict | None = None) -> Message:
    _, weights, _ = initial_weights(cfg)
    config = ConfigRecord({"server-round": server_round, PRIVACY_SPENT: json.dumps(on_record or {})})
    content = RecordDict({ARRAYS: to_arrayrecord(weights), CONFIG: config})
    return Message(content, dst_node_id=7, message_type="train")


RESTARTED_CLIENT = """
import json, sys
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
sys.path.insert(0, sys.argv[1])
from test_privacy import _context, _train_message
from client.app import train
from shared.config import Config
from pathlib import Path
cfg = Config.from_run_config(json.loads(sys.argv[2]))
out = train(_train_message(cfg, 2), _context(cfg, Path(sys.argv[3]), "video", Path(sys.argv[4])))
print(json.dumps(dict(out.content.metric_records["metrics"])))
"""


def test_a_private_round_refuses_an_item_memory_trained_without_dp(tiny_cfg, demo_dir, tmp_path):
    """A state folder whose item memory a plain round trained: DP-SGD would compute every noised gradient
    through values fitted without DP, so the private round refuses, and no weights leave."""
    state = tmp_path / "state"
    train(_train_message(tiny_cfg, 1), _context(tiny_cfg, demo_dir, "video", state))  # plain: the memory moves
    cfg = private(tiny_cfg)
    out = train(_train_message(cfg, 2), _context(cfg, demo_dir, "video", state))
    assert "was trained without DP" in str(out.content.config_records[INFO]["refused"])
    assert ARRAYS not in out.content.array_records
    fresh = train(_train_message(cfg, 1), _context(cfg, demo_dir, "video", tmp_path / "new"))  # a new state: trains
    assert "refused" not in fresh.content.config_records[INFO] and ARRAYS in fresh.content.array_records


def test_ledger_survives_a_process_restart_and_refuses_over_budget(tiny_cfg, demo_dir, tmp_path):
    cfg = Config.from_run_config(private(tiny_cfg).to_flat() | {"fed.rounds": 2})
    state = tmp_path / "state"
    first = train(_train_message(cfg, 1), _context(cfg, demo_dir, "video", state))
    ledger = Ledger.load(state / LEDGER)
    k = cfg.train.local_steps
    assert ledger.steps == k and ledger.rounds == [1]
    reported = first.content.metric_records[METRICS]
    assert reported["privacy.epsilon"] == pytest.approx(
        epsilon_of([(ledger.noise_multiplier, ledger.sample_rate, k)], ledger.delta)
    )
    assert reported["privacy.delta"] == pytest.approx(1 / 3600)

    # round 2 in a new process continues the stored ledger
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RESTARTED_CLIENT,
            str(__import__("pathlib").Path(__file__).parent),
            json.dumps(cfg.to_flat()),
            str(demo_dir),
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    second = json.loads(done.stdout.strip().splitlines()[-1])
    ledger = Ledger.load(state / LEDGER)
    assert ledger.steps == 2 * k and ledger.rounds == [1, 2]
    assert second["privacy.epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-12)
    assert ledger.epsilon() == pytest.approx(
        epsilon_of([(ledger.noise_multiplier, ledger.sample_rate, 2 * k)], ledger.delta)
    )
    assert second["privacy.epsilon"] <= cfg.privacy.epsilon

    # the planned run is spent: a third round is refused, the ledger is unchanged, the run continues without it
    refused = train(_train_message(cfg, 3), _context(cfg, demo_dir, "video", state))
    assert ARRAYS not in refused.content.array_records
    assert "privacy budget of scenario 'video' exhausted" in refused.content.config_records[INFO]["refused"]
    assert Ledger.load(state / LEDGER).steps == 2 * k
    others = [train(_train_message(cfg, 3), _context(cfg, demo_dir, s, tmp_path / s)) for s in ("shop", "news")]
    _, weights, _ = initial_weights(cfg)
    strategy = CrossrecFedAvg(expected_from(weights), dataclasses.replace(cfg.fed, min_clients=2))
    strategy.global_arrays = weights  # what configure_train keeps
    record, _ = strategy.aggregate_train(3, [refused, *others])
    assert record is not None and set(strategy.train_metrics) == {"shop", "news"}
    assert any('video: client refused: "privacy budget' in d for d in strategy.dropped), strategy.dropped


def test_ledger_location_and_replanning_is_refused(tiny_cfg, tmp_path):
    cfg = private(tiny_cfg)
    assert ledger_path(cfg, {"state-dir": str(tmp_path)}, "news") == tmp_path / LEDGER
    with_run = Config.from_run_config(cfg.to_flat() | {"run.dir": str(tmp_path / "run")})
    assert ledger_path(with_run, {"partition-id": 0}, "news") == tmp_path / "run/clients/news" / LEDGER
    with pytest.raises(ValueError, match="needs a place for the privacy ledger"):
        ledger_path(cfg, {"partition-id": 0}, "news")
    plan(cfg, "news", 100, 100).save(tmp_path / LEDGER)
    other = private(tiny_cfg, epsilon=2.0)
    with pytest.raises(ValueError, match="planned with target_epsilon = 8.0, the config now gives 2.0"):
        open_ledger(other, tmp_path / LEDGER, "news", 100, 100)
    (tmp_path / LEDGER).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        open_ledger(cfg, tmp_path / LEDGER, "news", 100, 100)


def test_resumed_simulation_continues_the_ledger_of_the_run_it_resumes(tiny_cfg, tmp_path):
    old = tmp_path / "runs/old"
    spent = plan(private(tiny_cfg), "news", 100, 100)
    spent.record(5, 1)
    spent.save(old / "clients/news" / LEDGER)
    flat = private(tiny_cfg).to_flat() | {
        "run.dir": str(tmp_path / "runs/new"),
        "run.resume": str(old / "checkpoints/round-0001"),
    }
    cfg = Config.from_run_config(flat)
    ledger = open_ledger(cfg, ledger_path(cfg, {}, "news"), "news", 100, 100)
    assert ledger.steps == 5 and ledger.epsilon() == spent.epsilon()


@pytest.mark.integration
def test_private_flower_simulation_reports_epsilon_per_scenario(tiny_cfg, tmp_path):
    from test_simulation import overrides

    from simulations.simulate import simulate

    run = simulate(overrides(tiny_cfg, **{"fed.rounds": 2, "privacy.epsilon": 4.0}), runs_dir=str(tmp_path))
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["privacy"]) == {"shop", "video", "news"}
    for name, spent in summary["privacy"].items():
        ledger = Ledger.load(run / "clients" / name / LEDGER)
        assert ledger.steps == 2 * tiny_cfg.train.local_steps and ledger.rounds == [1, 2]
        assert spent["epsilon"] == pytest.approx(ledger.epsilon()) and 3.9 <= spent["epsilon"] <= 4.0
        assert spent["delta"] == pytest.approx(1 / (10 * 360))
    meta = json.loads((run / "checkpoints/round-0001/meta.json").read_text())
    assert set(meta["privacy"]) == {"shop", "video", "news"}
    assert all(0 < p["epsilon"] < summary["privacy"][n]["epsilon"] for n, p in meta["privacy"].items())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for row in (r for r in rows if r["reference"] == "federated"):  # nothing computed outside DP-SGD is sent
        assert set(row["train"]) == {"privacy.epsilon", "privacy.delta", NUM_EXAMPLES}, row["train"]


def test_a_dp_step_that_leaves_a_trainable_weight_unchanged_fails_loudly(tiny_cfg, demo_dir):
    """The peft/Opacus pitfall: weights the optimiser does not update while epsilon is spent."""
    cfg = private(tiny_cfg)
    data = prepare(load_scenario(demo_dir / "shop"), cfg)
    model = build_model(cfg, data)
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    held = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in lora)]
    optimizer = torch.optim.AdamW(held, lr=1e-3)  # the LoRA weights are not in it
    assert model.memory is not None
    with pytest.raises(RuntimeError, match="left trainable weights without a noised gradient: .*lora_A"):
        one_dp_step(model, data, cfg, optimizer)


def one_dp_step(model, data, cfg: Config, optimizer: torch.optim.Optimizer) -> None:
    """One DP-SGD step of ``optimizer`` on a batch of the shop's users, the catalog parts frozen as
    train_round freezes them under DP."""
    for part in model.catalog_parts():
        part.requires_grad_(False)
    with DPSGD(plan(cfg, "shop", 360, 360), 360).attached(model, optimizer) as dp_optimizer:
        rng = np.random.default_rng(0)
        batch = make_batch(data, cfg, sample_users(data, cfg, rng, poisson=False), model.num_items, rng)
        model.train()
        loss_fn(model, batch, model.text_table(), 0.5, shared=False)[0].backward()
        DPSGD.step(dp_optimizer, model)


def test_dp_without_fresh_items_holds_the_adapters_and_gives_them_back(tiny_cfg, demo_dir):
    """train.fresh-items = 0 under DP: no item is encoded anew, so the LoRA adapters get no gradient; the round
    holds them (and the catalog parts) instead of failing, trains the rest, and leaves them trainable."""
    cfg = private(tiny_cfg, fresh_items=0)
    data = prepare(load_scenario(demo_dir / "shop"), cfg)
    model = build_model(cfg, data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    train_round(model, data, cfg, 1, DPSGD(plan(cfg, "shop", 360, 360), 360))
    after = dict(model.named_parameters())
    parts = {id(p) for part in model.catalog_parts() for p in part.parameters()}  # item memory, text adaptor
    held = [n for n, p in after.items() if n in trainable and (ADAPTER_MARK in n or id(p) in parts)]
    assert held and all(torch.equal(before[n], after[n]) for n in held)
    assert all(not torch.equal(before[n], after[n]) for n in trainable - set(held))  # noise reaches every other
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_a_weight_whose_dp_step_is_below_its_float_spacing_is_not_mistaken_for_a_lost_one(tiny_cfg, demo_dir):
    """The head's similarity scale is one large scalar: an Adam step can leave its float32 value as it was.
    That is a step taken, not a weight DP-SGD lost track of."""
    cfg = private(tiny_cfg)
    data = prepare(load_scenario(demo_dir / "shop"), cfg)
    model = build_model(cfg, data)
    torch.nn.init.constant_(model.head.similarity.weight, 1e8)  # float32 spacing there: 8, far above lr
    parts = {id(p) for part in model.catalog_parts() for p in part.parameters()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in parts]
    one_dp_step(model, data, cfg, torch.optim.AdamW(params, lr=1e-3, weight_decay=0))
    assert float(model.head.similarity.weight) == 1e8 and model.head.similarity.weight.grad is not None


def test_a_ledger_behind_the_servers_record_refuses_to_train(tiny_cfg, demo_dir, tmp_path, caplog):
    """Fail closed: the server sends the epsilon its checkpoints record per scenario; a client whose ledger
    is missing, emptied or older than that refuses (nothing spent, nothing sent), unless a new budget is
    asked for explicitly (then it trains, and says so in the log)."""
    cfg = Config.from_run_config(private(tiny_cfg).to_flat() | {"fed.rounds": 3})
    state = tmp_path / "state"
    first = train(_train_message(cfg, 1), _context(cfg, demo_dir, "video", state))
    spent = first.content.metric_records[METRICS]["privacy.epsilon"]
    record = {"video": {"epsilon": spent, "delta": 1 / 3600}, "shop": {"epsilon": 99.0, "delta": 1e-4}}
    kept = (state / LEDGER).read_text()

    for damage in ("deleted", "emptied"):
        if damage == "deleted":
            (state / LEDGER).unlink()
        else:
            fresh = json.loads(kept)
            fresh["history"], fresh["rounds"] = [], []
            (state / LEDGER).write_text(json.dumps(fresh))
        refused = train(_train_message(cfg, 2, record), _context(cfg, demo_dir, "video", state))
        why = refused.content.config_records[INFO]["refused"]
        assert ARRAYS not in refused.content.array_records, damage
        assert f"records epsilon 0.000 spent, but the federation's checkpoints record {spent:.3f}" in why, why
        assert "privacy.new-budget" in why
        assert not (state / LEDGER).exists() or Ledger.load(state / LEDGER).steps == 0  # nothing recorded

    # the intact ledger trains on, and says where it stands; a deliberately new budget is logged
    (state / LEDGER).write_text(kept)
    from simulations.cli import main

    assert main(["privacy-status", "--state-dir", str(state)]) == 0
    status = ledger_status(state)
    assert status["epsilon spent"] == pytest.approx(spent, abs=1e-4) and status["rounds trained"] == [1]
    assert status["rounds remaining (3 steps each)"] == 2  # planned: fed.rounds = 3
    assert (
        ARRAYS in train(_train_message(cfg, 2, record), _context(cfg, demo_dir, "video", state)).content.array_records
    )
    (state / LEDGER).unlink()
    again = Config.from_run_config(cfg.to_flat() | {"privacy.new-budget": True})
    with caplog.at_level("WARNING", logger="flwr.crossrec"):
        reply = train(_train_message(again, 2, record), _context(again, demo_dir, "video", state))
    assert ARRAYS in reply.content.array_records and "privacy.new-budget = true, so training anyway" in caplog.text
