"""Privacy report: DP step-time overhead and a membership-inference audit per scenario.

Step time: the same batch, alternately with a plain optimiser step and a DP-SGD step (Opacus
per-sample gradients, clipping, noise), median over repeats, one process.

Audit: per scenario, half the trainable users (seeded) are members: a model is trained on them
alone with the client's own training code (``fed.rounds`` x ``train.local-steps`` steps, plain or
DP-SGD at each epsilon); the other half are held out. The attack is a calibrated loss-threshold
attack: a user's score is how much training lowered their mean loss over all their training
pairs (initial model minus trained model, same fixed negatives). Attack AUC 0.5 = no better
than chance. Training alone on one scenario without federated averaging is the strongest
setting for the attacker, so the figures bound what leaves a client.

Utility (``--baseline RUN``): the federated simulation again at each epsilon (real Flower runs, the
same data and config), compared on the test split, round chosen on validation, with the non-private
federated reference of RUN (a ``crossrec simulate`` run folder on the same data and config); writes
``utility.png`` (macro primary metric against epsilon).

    python -m simulations.privacy_report --epsilons 1,4,8 [--data DIR] [--baseline runs/latest] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.privacy import DPSGD, plan
from client.training import LocalData, build_model, loss_fn, make_batch, sample_users, train_round
from shared.config import Config
from shared.data import load_scenario
from shared.demo import write_demo_federation
from shared.metrics import impression_metrics, primary_metric, select_rounds
from shared.model import RecModel

from .simulate import federated_rows, parse_overrides


def macro(rows: list[dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """Round chosen on validation; the test primary metric per scenario and its mean."""
    chosen = select_rounds(rows)
    per = {name: float(row["test"][primary_metric(row)]) for name, row in chosen.items()}
    return float(np.mean(list(per.values()))), per


def utility(
    baseline: Path, data_dir: Path, overrides: dict[str, Any], epsilons: list[float], out: Path
) -> dict[str, Any]:
    """Federated utility at each epsilon next to the non-private federated run in ``baseline``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_rows = [json.loads(x) for x in (baseline / "metrics.jsonl").read_text().splitlines()]
    base_value, base_per = macro([r for r in base_rows if r["reference"] == "federated"])
    table: dict[str, Any] = {"none": {"macro": base_value, "scenarios": base_per, "run": str(baseline)}}
    for eps in epsilons:
        started = time.time()
        flat = {**overrides, "data.dir": str(data_dir), "privacy.epsilon": eps}
        cfg = Config.from_run_config(Config().to_flat() | flat)
        rows, _ = federated_rows(out / f"federated-eps{eps:g}", flat, len(cfg.data.scenario_names), cfg.fed.rounds)
        value, per = macro([r for r in rows if r["reference"] == "federated"])
        last = max(int(r["round"]) for r in rows)
        spent = {r["scenario"]: r["train"]["privacy.epsilon"] for r in rows if int(r["round"]) == last}
        table[f"{eps:g}"] = {
            "macro": value,
            "scenarios": per,
            "ratio_to_non_private": value / base_value,
            "epsilon_spent": spent,
            "seconds": time.time() - started,
        }
        print(f"epsilon {eps:g}: macro {value:.4f} = {value / base_value:.2f} x non-private {base_value:.4f}")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(epsilons, [table[f"{e:g}"]["macro"] for e in epsilons], "o-", label="federated, user-level DP")
    ax.axhline(base_value, color="k", ls="--", label="federated, no DP")
    ax.set(xlabel="epsilon (per scenario, whole run)", ylabel="macro test metric (NDCG@10 / AUC)", xscale="log")
    ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "utility.png", dpi=120)
    plt.close(fig)
    return table


def step_times(cfg: Config, data: LocalData, repeats: int = 12) -> dict[str, float]:
    """Median seconds of a plain and of a DP-SGD optimiser step on the same batch, measured alternately."""
    model = build_model(cfg, data)
    text = model.text_table()
    rng = np.random.default_rng(cfg.train.seed)
    batch = make_batch(data, cfg, sample_users(data, cfg, rng, poisson=False), model.num_items, rng, per_user=True)
    params = [p for p in model.parameters() if p.requires_grad]
    timed = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, epsilon=cfg.privacy.epsilon or 8.0))
    ledger = plan(timed, data.scenario.name, len(data.scenario.users), len(data.trainable_users))
    dp = DPSGD(ledger, len(data.trainable_users))  # the noise multiplier does not change the work of a step
    model.train()

    def step(optimizer: torch.optim.Optimizer) -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch, text, cfg.train.aux_weight, shared=False)[0].backward()
        optimizer.step()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"plain": [], "dp": []}
    plain = torch.optim.AdamW(params, lr=cfg.train.lr)
    for _ in range(repeats + 1):  # the first pair warms up
        times["plain"].append(step(plain))
        with dp.attached(model, torch.optim.AdamW(params, lr=cfg.train.lr)) as optimizer:
            times["dp"].append(step(optimizer))
    out = {name: statistics.median(values[1:]) for name, values in times.items()}
    return {"plain_seconds": out["plain"], "dp_seconds": out["dp"], "ratio": out["dp"] / out["plain"]}


@torch.no_grad()
def user_losses(model: RecModel, data: LocalData, cfg: Config, users: np.ndarray, seed: int) -> np.ndarray:
    """Each user's training loss on its most recent training sequence (every position), its own fresh items
    fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    model.eval()
    text = model.text_table()
    out = np.empty(len(users))
    for row, u in enumerate(users):
        batch = make_batch(data, cfg, np.asarray([u]), model.num_items, rng, recent=True, per_user=True)
        out[row] = float(loss_fn(model, batch, text, cfg.train.aux_weight, shared=False)[0])
    return out


def membership_audit(cfg: Config, data: LocalData, epsilon: float) -> dict[str, float]:
    """Attack AUC of the calibrated loss-threshold attack on a model trained on half the users."""
    rng = np.random.default_rng([cfg.train.seed, 7])
    users = rng.permutation(data.trainable_users)
    members, held_out = np.sort(users[: len(users) // 2]), np.sort(users[len(users) // 2 :])
    train_data = dataclasses.replace(data, trainable_users=members)
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, epsilon=epsilon))
    model = build_model(cfg, data)
    everyone = np.concatenate([members, held_out])
    before = user_losses(model, data, cfg, everyone, seed=1)
    privacy = None
    ledger = None
    if epsilon > 0:
        ledger = plan(cfg, data.scenario.name, len(members), len(members))
        privacy = DPSGD(ledger, len(members))
    for server_round in range(1, cfg.fed.rounds + 1):
        train_round(model, train_data, cfg, server_round, privacy)
        if ledger is not None:
            ledger.record(cfg.train.local_steps, server_round)
    gain = before - user_losses(model, data, cfg, everyone, seed=1)
    is_member = np.r_[np.ones(len(members)), np.zeros(len(held_out))]
    result = {
        "attack_auc": impression_metrics([is_member], [gain])["auc"],
        "members": float(len(members)),
        "held_out": float(len(held_out)),
    }
    if ledger is not None:
        result |= {"epsilon": ledger.epsilon(), "delta": ledger.delta, "noise_multiplier": ledger.noise_multiplier}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder of canonical scenario folders (default: the demo federation)")
    parser.add_argument("--epsilons", default="1,4,8", help="private settings to audit, comma-separated")
    parser.add_argument("--run-config", default="", help='config overrides, e.g. "fed.rounds=4"')
    parser.add_argument("--out", default="runs/privacy-latest", help="folder for privacy.json")
    parser.add_argument("--baseline", help="a non-private `crossrec simulate` run folder: adds the utility runs")
    parser.add_argument("--skip-audit", action="store_true", help="utility runs only")
    parser.add_argument("--audit", help="audit settings, e.g. 'none,8' (default: none and every epsilon)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config.from_run_config(Config().to_flat() | parse_overrides(args.run_config))
    data_dir = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="crossrec-demo-"))
    if not args.data and args.baseline:
        data_dir = Path(args.baseline) / "data"  # the demo federation the baseline run wrote
    elif not args.data:
        write_demo_federation(data_dir, seed=0)
    from client.training import prepare

    private = [float(e) for e in args.epsilons.split(",") if e.strip()]
    epsilons = [0.0, *private]
    if args.audit:
        epsilons = [0.0 if e.strip() == "none" else float(e) for e in args.audit.split(",") if e.strip()]
    report: dict[str, Any] = {"config": cfg.to_flat(), "threads": torch.get_num_threads(), "scenarios": {}}
    if args.baseline:
        overrides = parse_overrides(args.run_config)
        report["utility"] = utility(Path(args.baseline).resolve(), data_dir.resolve(), overrides, private, out)
        (out / "privacy.json").write_text(json.dumps(report, indent=1) + "\n")
    for name in [] if args.skip_audit else cfg.data.scenario_names:
        data = prepare(load_scenario(data_dir / name, lenient=cfg.data.lenient), cfg)
        entry: dict[str, Any] = {"users": len(data.scenario.users), "step_time": step_times(cfg, data), "audit": {}}
        t = entry["step_time"]
        print(
            f"{name}: step {t['plain_seconds'] * 1e3:.0f} ms plain, "
            f"{t['dp_seconds'] * 1e3:.0f} ms DP ({t['ratio']:.2f}x)",
            flush=True,
        )
        for eps in epsilons:
            started = time.time()
            audit = membership_audit(cfg, data, eps)
            label = "non-private" if eps == 0 else f"epsilon {eps:g}"
            entry["audit"]["none" if eps == 0 else f"{eps:g}"] = audit | {"seconds": time.time() - started}
            print(f"{name}: {label}: attack AUC {audit['attack_auc']:.3f} ({time.time() - started:.0f}s)", flush=True)
            report["scenarios"][name] = entry
            (out / "privacy.json").write_text(json.dumps(report, indent=1) + "\n")  # keep what is done
    (out / "privacy.json").write_text(json.dumps(report, indent=1) + "\n")
    if report["scenarios"]:
        print(markdown(report))
    print(f"wrote {out / 'privacy.json'}")
    return 0


def markdown(report: dict[str, Any]) -> str:
    """Tables: step time per scenario, attack AUC per scenario and setting."""
    scenarios = report["scenarios"]
    settings = list(next(iter(scenarios.values()))["audit"])
    lines = ["| scenario | plain step (ms) | DP step (ms) | DP / plain |", "|---|---:|---:|---:|"]
    for name, entry in scenarios.items():
        t = entry["step_time"]
        lines.append(f"| {name} | {t['plain_seconds'] * 1e3:.0f} | {t['dp_seconds'] * 1e3:.0f} | {t['ratio']:.2f} |")
    head = " | ".join("no DP" if s == "none" else f"eps {s}" for s in settings)
    lines += ["", f"| scenario | {head} |", "|---|" + "---:|" * len(settings)]
    for name, entry in scenarios.items():
        lines.append(f"| {name} | " + " | ".join(f"{entry['audit'][s]['attack_auc']:.3f}" for s in settings) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
