"""Run-folder outputs: summary.json, report.md and PNG plots of metrics per round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared.metrics import METRIC_NAMES  # noqa: E402

Row = dict[str, Any]
PROTOCOL = (
    "leave-one-out per user (interactions ordered by timestamp, ties by item id): last item = test, "
    "second-to-last = validation; full ranking over the scenario's whole catalog, nothing masked; "
    "ties counted in expectation; the round of each trained reference is selected on validation NDCG@10 "
    "(federated: macro average over scenarios, one global model; local: per scenario)"
)


def summary(selected: dict[str, dict[str, Row]]) -> dict[str, Any]:
    """``{"protocol": ..., "scenarios": {NAME: {REFERENCE: {METRIC: test value}}}, "rounds": ...}``."""
    scenarios: dict[str, dict[str, dict[str, float]]] = {}
    rounds: dict[str, dict[str, int]] = {}
    for reference, rows in selected.items():
        for name, row in rows.items():
            scenarios.setdefault(name, {})[reference] = {m: float(row["test"][m]) for m in METRIC_NAMES}
            rounds.setdefault(name, {})[reference] = int(row["round"])
    return {"protocol": PROTOCOL, "scenarios": scenarios, "selected_round": rounds}


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    """One PNG per metric: validation value per round, one panel per scenario, a line per reference."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scenarios = sorted({str(r["scenario"]) for r in rows})
    paths = []
    for metric in METRIC_NAMES:
        fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.4), squeeze=False)
        for ax, name in zip(axes[0], scenarios, strict=True):
            for reference in ("federated", "local", "popularity"):
                pts = sorted(
                    (int(r["round"]), float(r["valid"][metric]))
                    for r in rows
                    if r["scenario"] == name and r["reference"] == reference
                )
                if reference == "popularity" and pts:
                    ax.axhline(pts[0][1], color="grey", linestyle="--", label="popularity")
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
        "| scenario | reference | round | " + " | ".join(METRIC_NAMES) + " |",
        "|---|---|---:|" + "---:|" * len(METRIC_NAMES),
    ]
    scenarios: dict[str, dict[str, dict[str, float]]] = result["scenarios"]
    rounds: dict[str, dict[str, int]] = result["selected_round"]
    for name, refs in scenarios.items():
        for reference, metrics in refs.items():
            values = " | ".join(f"{metrics[m]:.4f}" for m in METRIC_NAMES)
            lines.append(f"| {name} | {reference} | {rounds[name][reference]} | {values} |")
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


def write_outputs(
    run_dir: Path, rows: list[Row], selected: dict[str, dict[str, Row]], timings: dict[str, float], notes: list[str]
) -> dict[str, Any]:
    result = summary(selected)
    result["wall_seconds"] = timings
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, run_dir / "plots")
    (run_dir / "report.md").write_text(markdown(result, timings, notes))
    return result
