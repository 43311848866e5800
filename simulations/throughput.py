"""Training throughput of one client: positions per second, and where a step's time goes.

For each scenario, with the benchmark's run config: the median wall time of a whole training step
(forward, backward, optimiser) on sampled batches, the positions (next-item predictions) it trains on,
and the forward + backward time of its three parts measured alone on the same batch: the encoder (fresh
items through the LoRA layers), the sequence model (the causal encoder over the batch's sequences) and
the loss (full-catalog softmax, fresh-item softmax, auxiliary objectives, given the user vectors).
Writes ``OUT/throughput.json`` and prints a table.

    .venv/bin/python -m simulations.throughput --out runs/throughput
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from client.training import Batch, build_model, loss_fn, make_batch, round_rng, sample_users
from shared.config import Config
from shared.model import RecModel

from .benchmark import DEFAULT_DATA, DEFAULT_RUN_CONFIG, convert, parse_sources
from .simulate import load_datasets, parse_overrides


def part_times(model: RecModel, batch: Batch, text: torch.Tensor) -> tuple[float, float, float]:
    """Forward + backward seconds of the encoder, the sequence model and the loss, each alone on ``batch``."""
    inputs, targets = batch.seq[:, :-1], batch.seq[:, 1:]
    t0 = time.perf_counter()
    model.encode_items(batch.fresh.unique()).sum().backward()
    t1 = time.perf_counter()
    users = model.user(text[inputs.clamp(min=0)], inputs >= 0)
    users.sum().backward()
    t2 = time.perf_counter()
    fixed = users.detach().requires_grad_(True)
    logits = model.scores(fixed, text, torch.zeros(len(text)))
    torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0)).backward()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def measure(cfg: Config, data_dir: Path, name: str, steps: int) -> dict[str, float]:
    data = load_datasets(data_dir, Config.from_run_config({**cfg.to_flat(), "data.scenarios": name}))[0]
    model = build_model(cfg, data)
    text = model.text_table()
    rng = round_rng(cfg, name, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    model.train()
    rows: dict[str, list[float]] = {"step": [], "positions": [], "encoder": [], "sequence": [], "loss": []}
    for step in range(steps + 1):  # the first step warms up
        batch: Batch = make_batch(data, cfg, sample_users(data, cfg, rng, poisson=False), model.num_items, rng)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, parts = loss_fn(model, batch, text, cfg.train.aux_weight, shared=True)
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - started
        encoder, sequence, loss_only = part_times(model, batch, text)
        optimizer.zero_grad(set_to_none=True)
        if step:
            for key, value in zip(rows, (elapsed, parts["positions"], encoder, sequence, loss_only), strict=True):
                rows[key].append(value)
    median = {k: statistics.median(v) for k, v in rows.items()}
    parts_total = median["encoder"] + median["sequence"] + median["loss"]
    return {
        "step_seconds": median["step"],
        "positions_per_step": median["positions"],
        "positions_per_second": float(np.sum(rows["positions"]) / np.sum(rows["step"])),
        **{f"share_{k}": median[k] / parts_total for k in ("encoder", "sequence", "loss")},
        "num_items": float(model.num_items),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--scenarios", default="movies,ecommerce,news")
    parser.add_argument("--run-config", default="")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a simulated client has one)")
    parser.add_argument("--out", default="runs/throughput")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = Config.from_run_config({**DEFAULT_RUN_CONFIG, **parse_overrides(args.run_config)})
    results = {}
    sources = parse_sources(args.scenarios)
    convert(sources, Path(args.data), out / "data")
    for src in sources:
        results[src.name] = measure(cfg, out / "data", src.name, args.steps)
    lines = ["scenario     items  step s  positions  pos/s  encoder  sequence  loss"]
    for name, r in results.items():
        lines.append(
            f"{name:<10} {r['num_items']:7.0f} {r['step_seconds']:7.3f} {r['positions_per_step']:10.0f} "
            f"{r['positions_per_second']:6.0f} {r['share_encoder']:8.0%} {r['share_sequence']:9.0%} "
            f"{r['share_loss']:5.0%}"
        )
    print("\n".join(lines))
    (out / "throughput.json").write_text(json.dumps({"threads": args.threads, "scenarios": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
