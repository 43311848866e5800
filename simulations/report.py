"""Run-folder outputs: summary.json, report.md and PNG plots of metrics per round."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from client.evaluation import load_per_user, per_user_file  # noqa: E402
from shared.data import leave_one_out, load_scenario, train_counts  # noqa: E402
from shared.metrics import IMPRESSION_METRICS, METRIC_NAMES, paired_bootstrap  # noqa: E402

Row = dict[str, Any]
PROTOCOL = (
    "leave-one-out per user (interactions ordered by timestamp, ties by item id): last item = test, "
    "second-to-last = validation; full ranking over the scenario's whole catalog, nothing masked; "
    "impression scenarios (news): impressions split by id mod 10 ({0,1} test, {2} validation), each "
    "test impression's candidates ranked (AUC, MRR, nDCG@5/10 as MIND defines them); ties counted in "
    "expectation; ILD@10 and coverage@10 of the top 10 (ILD in the frozen encoder's item space); the round "
    "of each trained reference is selected on validation NDCG@10 (news: AUC): per scenario for local, "
    "one round for a global model (federated, centralized) on the mean over scenarios of the metric "
    "relative to its best round"
)
BEYOND_ACCURACY = ("ild@10", "coverage@10")
REFERENCE_ORDER = ("popularity", "zero_shot", "sasrec", "local", "centralized", "federated")


def paired_intervals(
    selected: dict[str, dict[str, Row]], folders: dict[str, Path], base: str = "federated"
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per scenario, ``base`` minus every other reference on the test split's primary metric (NDCG@10;
    news: AUC): the mean paired difference over the same test users (impressions) at each reference's
    selected round, with a 95 % bootstrap interval (:func:`paired_bootstrap`). References whose per-user
    values are not on disk (``folders[reference]``, :func:`per_user_file`) are left out."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, row in selected.get(base, {}).items():
        metric = "auc" if "auc" in row["test"] else "ndcg@10"
        own = per_user_file(folders[base], name, int(row["round"]))
        if not own.is_file():
            continue
        mine = load_per_user(own)[f"test.{metric}"]
        for reference, rows in selected.items():
            other = rows.get(name)
            if reference == base or other is None or reference not in folders:
                continue
            path = per_user_file(folders[reference], name, int(other["round"]))
            if path.is_file():
                theirs = load_per_user(path)[f"test.{metric}"]
                out.setdefault(name, {})[f"{base} - {reference}"] = {"metric": metric, **paired_bootstrap(mine, theirs)}
    return out


POPULARITY_EDGES = (0, 3, 10, 30, 100)  # buckets of a test target's count in the training log: [0, 3), ... [100, inf)


def by_target_popularity(
    selected: dict[str, dict[str, Row]], folders: dict[str, Path], data_dir: Path
) -> dict[str, dict[str, Any]]:
    """Per leave-one-out scenario (its canonical folder in ``data_dir``; impression scenarios have no single
    target and are left out): the test users bucketed by how often their target item occurs in the training
    log (:data:`POPULARITY_EDGES`), and each reference's mean test NDCG@10 per bucket at its selected round
    (None for an empty bucket): whether a model wins on the head of the catalog or on its tail."""
    out: dict[str, dict[str, Any]] = {}
    names = sorted({name for rows in selected.values() for name in rows})
    for name in names:
        if not (data_dir / name / "scenario.json").is_file():
            continue
        scenario = load_scenario(data_dir / name)
        if scenario.impressions is not None:
            continue
        split = leave_one_out(scenario)
        counts = train_counts(split, scenario.num_items)[split.test_target]
        bucket = np.searchsorted(POPULARITY_EDGES, counts, side="right") - 1
        members = [bucket == b for b in range(len(POPULARITY_EDGES))]
        ndcg: dict[str, list[float | None]] = {}
        for reference, rows in selected.items():
            row = rows.get(name)
            if row is None or reference not in folders:
                continue
            path = per_user_file(folders[reference], name, int(row["round"]))
            if not path.is_file():
                continue
            values = load_per_user(path)["test.ndcg@10"]
            ndcg[reference] = [float(values[m].mean()) if m.any() else None for m in members]
        out[name] = {"edges": list(POPULARITY_EDGES), "users": [int(m.sum()) for m in members], "ndcg@10": ndcg}
    return out


def popularity_table(popularity: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: test NDCG@10 per bucket of the target's training count, one table row per reference."""
    lines: list[str] = []
    for name, entry in popularity.items():
        edges = entry["edges"]
        heads = [f"[{lo}, {hi})" for lo, hi in itertools.pairwise(edges)] + [f">= {edges[-1]}"]
        lines += [
            f"| {name}: target seen in training | " + " | ".join(heads) + " |",
            "|---|" + "---:|" * len(heads),
            "| test users | " + " | ".join(str(n) for n in entry["users"]) + " |",
        ]
        for reference, values in entry["ndcg@10"].items():
            lines.append(f"| {reference} | " + " | ".join("" if v is None else f"{v:.4f}" for v in values) + " |")
        lines.append("")
    return lines


def verdict(p: dict[str, Any]) -> str:
    """What a paired difference with its 95 % interval (``lo``, ``hi``) lets one claim."""
    return "better" if p["lo"] > 0 else "worse" if p["hi"] < 0 else "within noise"


def paired_table(paired: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Markdown table of paired differences with their 95 % intervals and what they let one claim."""
    lines = [
        "| scenario | comparison | metric | difference | 95 % interval | users | verdict |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for name, comparisons in paired.items():
        for what, p in comparisons.items():
            lines.append(
                f"| {name} | {what} | {p['metric']} | {p['diff']:+.4f} | [{p['lo']:+.4f}, {p['hi']:+.4f}] "
                f"| {p['n']} | {verdict(p)} |"
            )
    return lines


def metric_names(metrics: dict[str, Any]) -> list[str]:
    """The metrics present, in a fixed order: impression or ranking metrics, ILD and coverage, the rest."""
    order = (*(IMPRESSION_METRICS if "auc" in metrics else METRIC_NAMES), *BEYOND_ACCURACY)
    known = [m for m in order if m in metrics]
    return known + sorted(m for m in metrics if m not in known)


def summary(selected: dict[str, dict[str, Row]]) -> dict[str, Any]:
    """``{"protocol": ..., "scenarios": {NAME: {REFERENCE: {METRIC: test value}}}, "selected_round": ...}``."""
    scenarios: dict[str, dict[str, dict[str, float]]] = {}
    rounds: dict[str, dict[str, int]] = {}
    for reference, rows in selected.items():
        for name, row in rows.items():
            scenarios.setdefault(name, {})[reference] = {m: float(row["test"][m]) for m in metric_names(row["test"])}
            rounds.setdefault(name, {})[reference] = int(row["round"])
    return {"protocol": PROTOCOL, "scenarios": scenarios, "selected_round": rounds}


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    """One PNG per metric: validation value per round, one panel per scenario that has the metric, a line per
    trained reference and a dashed level per untrained one (round 0)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    references = [r for r in REFERENCE_ORDER if any(x["reference"] == r for x in rows)]
    references += sorted({str(x["reference"]) for x in rows} - set(references))
    for metric in metric_names({m: 0 for r in rows for m in r["valid"]}):
        scenarios = sorted({str(r["scenario"]) for r in rows if metric in r["valid"]})
        fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.4), squeeze=False)
        for ax, name in zip(axes[0], scenarios, strict=True):
            for reference in references:
                pts = sorted(
                    (int(r["round"]), float(r["valid"][metric]))
                    for r in rows
                    if r["scenario"] == name and r["reference"] == reference and metric in r["valid"]
                )
                if pts and pts[-1][0] == 0:
                    ax.axhline(
                        pts[0][1], color="grey", linestyle="--" if reference == "popularity" else ":", label=reference
                    )
                elif pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=reference)
            ax.set_title(name)
            ax.set_xlabel("round")
            ax.set_ylabel(f"validation {metric}")
            ax.grid(alpha=0.3)
        axes[0][0].legend()
        fig.tight_layout()
        path = out_dir / f"{metric.replace('@', '_at_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(result: dict[str, Any], timings: dict[str, float], notes: list[str]) -> str:
    """The run's report.md."""
    lines = [
        "# crossrec run report",
        "",
        f"**Protocol.** {result['protocol']}.",
        "",
        "## Test metrics",
        "",
        *results_table(result),
    ]
    if result.get("paired"):
        lines += ["## Paired differences (test, same users)", "", *paired_table(result["paired"]), ""]
    if result.get("popularity"):
        lines += [
            "## Test NDCG@10 by how often the target occurs in training",
            "",
            *popularity_table(result["popularity"]),
        ]
    lines += [
        "",
        "Round 0 = not trained. Plots of validation metrics per round: `plots/*.png`.",
        "",
        "## Wall time",
        "",
    ]
    lines += [f"- {k}: {v:.1f} s" for k, v in timings.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def results_table(result: dict[str, Any]) -> list[str]:
    """Markdown table(s) of the test metrics: one per set of metrics (ranking scenarios, impression scenarios)."""
    scenarios: dict[str, dict[str, dict[str, float]]] = result["scenarios"]
    rounds: dict[str, dict[str, int]] = result["selected_round"]
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, refs in scenarios.items():
        names = tuple(metric_names({m: 0 for metrics in refs.values() for m in metrics}))
        groups.setdefault(names, []).append(name)
    lines: list[str] = []
    for names, members in groups.items():
        lines += [
            "| scenario | reference | round | " + " | ".join(names) + " |",
            "|---|---|---:|" + "---:|" * len(names),
        ]
        for name in members:
            for reference, metrics in scenarios[name].items():
                values = " | ".join(f"{metrics[m]:.4f}" if m in metrics else "" for m in names)
                lines.append(f"| {name} | {reference} | {rounds[name][reference]} | {values} |")
        lines.append("")
    return lines


def privacy_spent(rows: list[Row]) -> dict[str, dict[str, dict[str, float]]]:
    """Per private reference and scenario, the epsilon and delta reported by the last round a client trained."""
    spent: dict[str, dict[str, dict[str, float]]] = {}
    for row in sorted(rows, key=lambda r: int(r["round"])):
        train = row.get("train", {})
        if "privacy.epsilon" in train:
            spent.setdefault(str(row["reference"]), {})[str(row["scenario"])] = {
                "epsilon": float(train["privacy.epsilon"]),
                "delta": float(train["privacy.delta"]),
            }
    return spent


def write_outputs(
    run_dir: Path,
    rows: list[Row],
    selected: dict[str, dict[str, Row]],
    timings: dict[str, float],
    notes: list[str],
    extra: dict[str, Any] | None = None,
    folders: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """summary.json (with paired intervals where per-user values are in ``folders``), report.md, plots."""
    result = summary(selected)
    if folders:
        result["paired"] = paired_intervals(selected, folders)
    spent = privacy_spent(rows)
    if spent:  # privacy.NAME.{epsilon,delta}: the main private reference; every private one by reference
        result["privacy"] = spent.get("federated", next(iter(spent.values())))
        result["privacy_by_reference"] = spent
    result["wall_seconds"] = timings
    result |= extra or {}
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, run_dir / "plots")
    (run_dir / "report.md").write_text(markdown(result, timings, notes))
    return result
