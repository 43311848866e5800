"""The ``crossrec`` command."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from pathlib import Path

CHECKPOINT_HELP = "run folder (its round chosen on validation), checkpoint folder or adapter export"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crossrec", description="Federated multi-scenario recommendation.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--debug", action="store_true", help="debug logs, and the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a local federated simulation with its reference points")
    sim.add_argument("--run-config", default="", help='overrides, e.g. "fed.rounds=4 train.lr=0.001"')
    sim.add_argument("--data", default=None, help="folder of scenario folders (default: the demo federation)")
    sim.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs)")
    sim.add_argument("--demo-seed", type=int, default=0, help="seed of the demo federation")
    demo = sub.add_parser("demo-data", help="write the demo federation in the canonical format")
    demo.add_argument("out", help="output folder (one sub-folder per scenario)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="replace existing scenario folders")
    conv = sub.add_parser("convert", help="write a public dataset as a canonical scenario folder")
    conv.add_argument("format", choices=["movielens", "ml-100k", "amazon", "mind"])
    conv.add_argument("src", help="the dataset folder (e.g. ../shared/data/movies/ml-latest-small)")
    conv.add_argument("out", help="the scenario folder to write")
    conv.add_argument("--name", default=None, help="scenario name (default: movies / ecommerce / news)")
    conv.add_argument("--lenient", action="store_true", help="skip malformed rows and report them")
    conv.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    bench = sub.add_parser("benchmark", help="real public scenarios: every reference point on the same splits")
    bench.add_argument(
        "--data", default=None, help="benchmark data directory (default: ../shared/data beside the repo)"
    )
    bench.add_argument(
        "--scenarios",
        default="movies,ecommerce,news",
        help="known names (movies, ml-100k, ecommerce, news) or NAME=FORMAT:PATH",
    )
    bench.add_argument("--run-config", default="", help='overrides of the benchmark defaults, e.g. "fed.rounds=3"')
    bench.add_argument("--runs-dir", default="runs", help="where the run folder goes (default: runs)")
    bench.add_argument("--epsilons", default="", help="add private federated references, e.g. 1,4,8")
    bench.add_argument(
        "--references", default="federated,zero_shot,popularity,local,centralized,sasrec", help="subset to run"
    )
    bench.add_argument("--merge", default="", help="combine finished benchmark runs (comma-separated folders)")
    bench.add_argument(
        "--sequential",
        action="store_true",
        help="one reference after another (default: the Flower simulation runs beside the in-process references)",
    )
    for name, text in (("recommend", "print recommendations from a checkpoint"), ("serve", "run the HTTP service")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
        p.add_argument("--data", required=True, action="append", help="a scenario folder (repeat for several)")
        p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "crossrec"), help="item-vector cache")
        p.add_argument(
            "--state-dir",
            action="append",
            default=[],
            help="a client's state folder holding its private item memory (repeat; default: the run's clients/)",
        )
        p.add_argument("--run-config", default="", help='serve.* overrides, e.g. "serve.diversity=0.2"')
        p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=8000)
            p.add_argument(
                "--reload-root",
                default=None,
                help="turn /reload on for checkpoints under this folder (token: env CROSSREC_RELOAD_TOKEN)",
            )
            p.add_argument(
                "--ab-checkpoint",
                default=None,
                help="A/B test: the checkpoint that serves arm B (the serve.ab-share of users; default: --checkpoint)",
            )
        else:
            p.add_argument("--scenario", default=None, help="default: the only scenario given")
            p.add_argument("--user", default=None, help="a user id of the scenario's log")
            p.add_argument("--history", default=None, help="comma-separated item ids, oldest first")
            p.add_argument("--history-text", action="append", default=None, help="a free item text (repeat)")
            p.add_argument("--k", type=int, default=10)
            p.add_argument("--weights", default=None, help='e.g. "engagement=1,satisfaction=0.5"')
            p.add_argument("--diversity", type=float, default=None)
            p.add_argument("--exclude-seen", action="store_true")
    ev = sub.add_parser("evaluate", help="any checkpoint on any scenario folders, with the benchmark's protocol")
    ev.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    ev.add_argument("--data", required=True, action="append", help="a scenario folder (repeat for several)")
    ev.add_argument(
        "--split", default="test", choices=["test", "valid"], help="split of the printed table (JSON: both)"
    )
    ev.add_argument("--references", default="", help="beside it: popularity, zero_shot (comma-separated)")
    ev.add_argument(
        "--state-dir", action="append", default=[], help="a client's state folder with its private item memory"
    )
    ev.add_argument("--json", default=None, help="write every figure to this JSON file")
    ev.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    check = sub.add_parser("check-data", help="load, validate and describe a scenario folder")
    check.add_argument("folder", help="the scenario folder")
    check.add_argument("--run-config", default="", help="the model config it must fit (model.objectives, ...)")
    ingest = sub.add_parser("ingest", help="append the service's recorded feedback to a scenario's log, once")
    ingest.add_argument("--feedback", required=True, help="the service's feedback database (serve.feedback-db)")
    ingest.add_argument("--data", required=True, help="the scenario folder whose log the next round trains on")
    abtest = sub.add_parser("abtest", help="A/B tests from the service's feedback")
    abtest_sub = abtest.add_subparsers(dest="abtest_command", required=True)
    ab_report = abtest_sub.add_parser("report", help="per-arm reward and B - A with an always-valid interval")
    ab_report.add_argument("--feedback", required=True, help="the service's feedback database (serve.feedback-db)")
    ab_report.add_argument("--scenario", required=True)
    ab_report.add_argument("--mde", type=float, required=True, help="minimum detectable effect (reward per impression)")
    ab_report.add_argument(
        "--alpha", type=float, default=0.05, help="chance of a false declaration, however often read"
    )
    ab_report.add_argument("--power", type=float, default=0.8, help="for the planned sample size")
    ab_report.add_argument("--json", default=None, help="also write the report to this JSON file")
    status = sub.add_parser("privacy-status", help="what a client's privacy ledger says: target, spent, remaining")
    status.add_argument("--state-dir", required=True, help="the client's state folder (simulation: RUN/clients/NAME)")
    certs = sub.add_parser("certs", help="make a local CA, a SuperLink certificate and SuperNode keys (for trying)")
    certs.add_argument("out", help="output folder (must not hold earlier certificates)")
    certs.add_argument("--host", action="append", default=[], help="a name or IP the SuperLink is reached at (repeat)")
    certs.add_argument("--supernode", action="append", default=[], help="a SuperNode key pair to make (repeat)")
    link = sub.add_parser("superlink", help="run a SuperLink (TLS, SuperNode authentication) until stopped")
    link.add_argument("--state-dir", required=True, help="its state: database, log, runs/")
    link.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    link.add_argument("--port", type=int, default=9093, help="the one port SuperNodes and `submit` use")
    link.add_argument("--ca", required=True, help="CA certificate (ca.crt)")
    link.add_argument("--cert", required=True, help="SuperLink certificate (server.pem)")
    link.add_argument("--key", required=True, help="its private key (server.key)")
    link.add_argument("--register", action="append", default=[], help="a SuperNode public key to admit (repeat)")
    register = sub.add_parser("register", help="admit SuperNode public keys to a running SuperLink (no restarts)")
    register.add_argument("--state-dir", required=True, help="the running SuperLink's state folder")
    register.add_argument("keys", nargs="+", help="SuperNode public keys (NAME.pub)")
    submit = sub.add_parser("submit", help="run federated rounds on a SuperLink, streaming the server log")
    submit.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    submit.add_argument("--ca", required=True, help="CA certificate (ca.crt)")
    submit.add_argument("--run-config", default="", help="overrides, e.g. \"fed.rounds=4 run.dir='/srv/runs/a'\"")
    client = sub.add_parser("client", help="run one scenario's client daemon (a SuperNode) until stopped")
    client.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    client.add_argument("--data", required=True, help="the scenario folder")
    client.add_argument("--ca", required=True, help="CA certificate (ca.crt)")
    client.add_argument("--key", required=True, help="this SuperNode's private key")
    client.add_argument("--state-dir", required=True, help="client state that must persist (privacy ledger, ...)")
    client.add_argument("--scenario", default=None, help="refuse to start unless the data holds this scenario")
    client.add_argument("--port", type=int, default=9094, help="local Runtime API port (one per SuperNode on a host)")
    client.add_argument("--run-config", default="", help="config the data is checked against (model.objectives, ...)")
    args = parser.parse_args(argv)

    root = logging.getLogger()
    if not root.handlers:  # (a host application's or pytest's handlers stay as they are)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler.addFilter(lambda record: not record.name.startswith("flwr"))  # Flower prints its own lines
        root.addHandler(handler)
    root.setLevel("DEBUG" if args.debug else args.log_level)
    from server.launch import stop_children_on_signal

    guard = stop_children_on_signal() if args.command in ("simulate", "benchmark") else contextlib.nullcontext()
    with guard:
        return run(args)


def run(args: argparse.Namespace) -> int:
    """Carry out one parsed command; 1 with a one-line error for bad input."""
    try:
        if getattr(args, "threads", 0):
            if args.threads < 0:
                raise ValueError(f"--threads {args.threads}: must be >= 1 (or 0: torch's choice)")
            import torch

            torch.set_num_threads(args.threads)
        if args.command == "simulate":
            from .simulate import simulate

            simulate(args.run_config, args.data, args.runs_dir, args.demo_seed)
        elif args.command == "demo-data":
            from shared.demo import write_demo_federation

            names = write_demo_federation(args.out, seed=args.seed, force=args.force)
            print("wrote", ", ".join(names), "to", args.out)
        elif args.command == "benchmark":
            from .benchmark import benchmark, merge, parse_epsilons

            if args.merge:
                merge([m for m in args.merge.split(",") if m], args.runs_dir)
                return 0

            benchmark(
                args.data,
                args.scenarios,
                args.run_config,
                args.runs_dir,
                parse_epsilons(args.epsilons),
                [r.strip() for r in args.references.split(",") if r.strip()],
                concurrent=not args.sequential,
            )
        elif args.command == "convert":
            convert(args.format, args.src, args.out, args.name, args.lenient, args.force)
        elif args.command == "evaluate":
            from .assess import evaluate_checkpoint

            references = [r.strip() for r in args.references.split(",") if r.strip()]
            evaluate_checkpoint(args.checkpoint, args.data, references, args.state_dir, args.split, args.json)
        elif args.command == "check-data":
            from shared.config import Config

            from .assess import check_data
            from .simulate import parse_overrides

            check_data(args.folder, Config.from_run_config(parse_overrides(args.run_config)))
        elif args.command == "ingest":
            from client.feedback import FeedbackStore
            from client.feedback import ingest as ingest_feedback

            if not Path(args.feedback).is_file():
                raise ValueError(f"{args.feedback}: no feedback database there")
            added, already = ingest_feedback(FeedbackStore(args.feedback), args.data)
            print(f"added {added} interactions to {Path(args.data) / 'interactions.jsonl'} ({already} already there)")
        elif args.command == "abtest":
            from client.abtest import report
            from client.feedback import FeedbackStore

            if not Path(args.feedback).is_file():
                raise ValueError(f"{args.feedback}: no feedback database there")
            result = report(FeedbackStore(args.feedback).arm_rewards(args.scenario), args.mde, args.alpha, args.power)
            print("\n".join(result.lines()))
            if args.json:
                Path(args.json).write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
        elif args.command == "privacy-status":
            from client.privacy import ledger_status

            for key, value in ledger_status(args.state_dir).items():
                print(f"{key}: {value}")
        elif args.command in ("recommend", "serve"):
            from .serving_cli import recommend, serve

            (recommend if args.command == "recommend" else serve)(args)
        elif args.command in ("certs", "superlink", "register", "submit", "client"):
            deploy(args)
    except (ValueError, RuntimeError, OSError) as exc:  # bad input, a failed step: what to fix, in one line
        if args.debug:
            raise
        print(f"crossrec: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a fault of crossrec itself: one line, the traceback on request
        if args.debug:
            raise
        print(
            f"crossrec: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 2
    return 0


def deploy(args: argparse.Namespace) -> None:
    """The deployed-federation commands (server/deploy.py, client/daemon.py, server/certs.py)."""
    if args.command == "certs":
        from server.certs import make_certificates

        out = make_certificates(args.out, list(dict.fromkeys([*args.host, "localhost", "127.0.0.1"])), args.supernode)
        print(f"wrote ca.crt, ca.key, server.pem, server.key and {len(args.supernode)} SuperNode key pairs to {out}")
    elif args.command == "superlink":
        from server.deploy import serve_superlink

        serve_superlink(
            Path(args.state_dir), args.host, args.port, Path(args.ca), Path(args.cert), Path(args.key),
            [Path(k) for k in args.register],
        )  # fmt: skip
    elif args.command == "register":
        from server.deploy import register_with_running

        for line in register_with_running(Path(args.state_dir), [Path(k) for k in args.keys]):
            print(line)
    elif args.command == "submit":
        from server.deploy import submit

        from .simulate import parse_overrides

        submit(args.superlink, Path(args.ca), parse_overrides(args.run_config))
    else:
        from client.daemon import run_client

        from .simulate import parse_overrides

        run_client(
            args.superlink, Path(args.data), Path(args.ca), Path(args.key), Path(args.state_dir), args.scenario,
            args.port, parse_overrides(args.run_config),
        )  # fmt: skip


def convert(fmt: str, src: str, out: str, name: str | None, lenient: bool, force: bool = False) -> None:
    """Load a public dataset with its validating loader and write it in the canonical format (never into,
    over or around the source; an existing non-empty output only with ``force``)."""
    from shared.data import write_scenario
    from shared.loaders import load_public

    source, target = Path(src).resolve(), Path(out).resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ValueError(f"output {out} is, holds or lies inside the source {src}: choose another output folder")
    scenario, stamps = load_public(fmt, src, name=name, lenient=lenient)
    write_scenario(out, scenario, stamps, force=force)
    print(
        f"wrote {scenario.name}: {scenario.num_items} items, {len(scenario.users)} users, "
        f"{scenario.num_interactions} interactions to {out}"
    )
    for reason, count in scenario.skipped.items():
        print(f"  skipped {count} rows: {reason}")


if __name__ == "__main__":
    sys.exit(main())
