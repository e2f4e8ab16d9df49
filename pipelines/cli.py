"""The ``capfilt`` command: one sub-command per stage, each over a config and a run root."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import ConfigError, load_config


def _common(p: argparse.ArgumentParser, root_required: bool = True) -> None:
    p.add_argument("--config", required=True, help="YAML config (path or fsspec URL)")
    p.add_argument("--root", required=root_required, help="run root (path or fsspec URL, e.g. s3://bucket/run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set world.noise_rate=0.5 (repeatable)")


def shipped_config(name: str) -> str:
    """A config shipped in flows/configs/ (installed with the package)."""
    from pathlib import Path

    import flows

    return str(Path(flows.__file__).parent / "configs" / name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("synth", help="generate the synthetic world under <root>/world/"))
    _common(sub.add_parser("ingest", help="download the URL list with img2dataset into <root>/ingest/<source>/"))
    pre = sub.add_parser("pretrain", help="pre-train round K (ITC + ITM + LM) into <root>/round=K/pretrain/")
    _common(pre)
    pre.add_argument("--round", type=int, required=True, help="round K (from 1)")
    fine = sub.add_parser("finetune", help="fine-tune round K's captioner or filter into <root>/round=K/<role>/")
    _common(fine)
    fine.add_argument("--round", type=int, required=True, help="round K (from 1)")
    fine.add_argument("--role", required=True, choices=["captioner", "filter"])
    cf = sub.add_parser("caption-filter", help="caption and filter the ingested images into <root>/round=K/capfilt/")
    _common(cf)
    cf.add_argument("--round", type=int, required=True, help="round K: uses round K's captioner and filter")
    asm = sub.add_parser("assemble", help="round K's bootstrapped dataset manifest into <root>/round=K/dataset/")
    _common(asm)
    asm.add_argument("--round", type=int, required=True, help="round K")
    ev = sub.add_parser("eval", help="evaluate round K's pre-trained model on the held-out set into <root>/round=K/eval/")
    _common(ev)
    ev.add_argument("--round", type=int, required=True, help="round K")
    rep = sub.add_parser("report", help="round K's self-contained HTML report into <root>/round=K/eval/report.html")
    _common(rep)
    rep.add_argument("--round", type=int, required=True, help="round K")
    rep.add_argument("--samples", type=int, default=24, help="sample images shown (default 24)")
    boot = sub.add_parser("bootstrap", help="the whole flow in-process (Prefect flow `capfilt`, local or RAY_ADDRESS Ray)")
    _common(boot, root_required=False)
    demo = sub.add_parser("demo", help="the embedded demo (make demo): bootstrap on flows/configs/demo.yaml")
    demo.add_argument("--root", default="runs/demo")
    demo.add_argument("--config", default=None, help="default: the shipped flows/configs/demo.yaml")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dep = sub.add_parser("deploy", help="register deployment `bootstrap` of flow `capfilt` on a process work pool")
    dep.add_argument("--pool", default=None, help="work pool name (created as a process pool if missing); default: infra/prefect/prefect.yaml's")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "deploy":
        from flows.deploy import deploy

        print(deploy(args.pool))
        return 0
    if args.command == "demo":
        args.config = args.config or shipped_config("demo.yaml")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"capfilt: {err}", file=sys.stderr)
        return 2
    if args.command == "bootstrap" and not args.root:
        args.root = f"runs/{cfg.name}"
    if args.command in ("bootstrap", "demo"):
        from .storage import check_root_writable

        try:  # before Prefect or Ray start: a bad root fails in a second, not after minutes of work
            check_root_writable(args.root)
        except PermissionError as err:
            print(f"capfilt {args.command}: {err}", file=sys.stderr)
            return 2
    if args.command == "synth":
        from .synthetic import WorldExistsError, run_synth

        try:
            run_synth(cfg, args.root)
        except (WorldExistsError, ValueError) as err:
            print(f"capfilt synth: {err}", file=sys.stderr)
            return 1
    elif args.command == "ingest":
        from .ingest import IngestError, IngestIncomplete, run_ingest

        try:
            run_ingest(cfg, args.root)
        except (IngestError, IngestIncomplete) as err:
            print(f"capfilt ingest: {err}", file=sys.stderr)
            return 1
    elif args.command in ("pretrain", "finetune"):
        from .train import TrainError, run_job

        job = "pretrain" if args.command == "pretrain" else args.role
        try:
            summary = run_job(cfg, args.root, args.round, job)
        except TrainError as err:
            print(f"capfilt {args.command}: {err}", file=sys.stderr)
            return 1
        print(json.dumps({k: summary.get(k) for k in ("job", "round", "model", "model_id", "final_step", "eval")}))
    elif args.command == "caption-filter":
        from .capfilt import CapfiltError, run_caption_filter
        from .shards import NotCommittedError

        try:
            summary = run_caption_filter(cfg, args.root, args.round)
        except (CapfiltError, NotCommittedError, FileNotFoundError) as err:
            print(f"capfilt caption-filter: {err}", file=sys.stderr)
            return 1
        print(json.dumps({k: summary.get(k) for k in ("round", "images", "rows", "by_source", "by_status", "this_run")}))
    elif args.command == "assemble":
        from .assemble import AssembleError, run_assemble

        try:
            summary = run_assemble(cfg, args.root, args.round)
        except (AssembleError, FileNotFoundError) as err:
            print(f"capfilt assemble: {err}", file=sys.stderr)
            return 1
        print(json.dumps(summary))
    elif args.command in ("bootstrap", "demo"):
        from flows.bootstrap import capfilt as capfilt_flow

        try:
            summary = capfilt_flow(config=args.config, root=args.root, overrides=args.overrides)
        except Exception as err:  # noqa: BLE001 - Prefect has logged the traceback; end with one line
            print(f"capfilt {args.command}: the flow failed: {type(err).__name__}: {err}\n"
                  f"Committed stages are kept: rerun the same command to resume.", file=sys.stderr)
            return 1
        print("\n" + summary["report"]["text"])
    elif args.command == "report":
        from .report import run_report

        try:
            print(run_report(cfg, args.root, args.round, samples=args.samples))
        except OSError as err:
            print(f"capfilt report: {err}", file=sys.stderr)
            return 1
    elif args.command == "eval":
        from .evaluate import run_eval

        try:
            metrics = run_eval(cfg, args.root, args.round)
        except FileNotFoundError as err:
            print(f"capfilt eval: {err}", file=sys.stderr)
            return 1
        print(json.dumps({k: metrics.get(k) for k in ("round", "retrieval_r1", "caption_attribute_accuracy", "cider")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
