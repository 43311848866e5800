"""The ``crossrec`` command."""

from __future__ import annotations

import argparse
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crossrec", description="Federated multi-scenario recommendation.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a local federated simulation with its reference points")
    sim.add_argument("--run-config", default="", help='overrides, e.g. "fed.rounds=4 train.lr=0.001"')
    sim.add_argument("--data", default=None, help="folder of scenario folders (default: the demo federation)")
    sim.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs)")
    sim.add_argument("--demo-seed", type=int, default=0, help="seed of the demo federation")
    demo = sub.add_parser("demo-data", help="write the demo federation in the canonical format")
    demo.add_argument("out", help="output folder (one sub-folder per scenario)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    try:
        if args.command == "simulate":
            from .simulate import simulate

            simulate(args.run_config, args.data, args.runs_dir, args.demo_seed)
        elif args.command == "demo-data":
            from shared.demo import write_demo_federation

            print("wrote", ", ".join(write_demo_federation(args.out, seed=args.seed)), "to", args.out)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"crossrec: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
