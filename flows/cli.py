"""The ``capfilt`` command: one sub-command per stage, each over a config and a run root.

It sits above the flows (``capfilt bootstrap``/``curate``/``demo`` run the Prefect flow, ``capfilt deploy``
registers it), so it lives in ``flows``; the stages it calls are ``pipelines``'. ``main`` sets Ray's and Prefect's
environment (``flows.runtime.configure_environment``) before anything imports either: importing this module sets
nothing."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipelines.config import ConfigError, load_config
from pipelines.errors import StageError

from .runtime import configure_environment


def _common(p: argparse.ArgumentParser, root_required: bool = True) -> None:
    p.add_argument("--config", required=True, help="YAML config (path or fsspec URL)")
    p.add_argument("--root", required=root_required, help="run root (path or fsspec URL, e.g. s3://bucket/run)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set world.noise_rate=0.5 (repeatable)",
    )


def shipped_config(name: str) -> str:
    """A config shipped in flows/configs/ (installed with the package)."""
    return str(Path(__file__).resolve().parent / "configs" / name)


def _round_stage(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A stage that works on one bootstrap round: --config, --root, --set and --round."""
    p = sub.add_parser(name, help=help)
    _common(p)
    p.add_argument("--round", type=int, required=True, help="round K (from 1)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("synth", help="generate the synthetic world under <root>/world/"))
    ing = sub.add_parser("ingest", help="download the URL list with img2dataset into <root>/ingest/<source>/")
    _common(ing)
    ing.add_argument(
        "--retry-failed",
        action="store_true",
        help="on a committed ingest: download again only the URLs that failed transiently (timeouts, HTTP 5xx, "
        "connection errors; not 404 or undecodable) into new shards, and update the manifest",
    )
    _round_stage(sub, "pretrain", "pre-train round K (ITC + ITM + LM) into <root>/round=K/pretrain/")
    fine = _round_stage(
        sub,
        "finetune",
        "fine-tune round K's captioner, filter or shared captioner+filter (the "
        "paper's sharing ablation) into <root>/round=K/<role>/",
    )
    fine.add_argument("--role", required=True, choices=["captioner", "filter", "shared"])
    _round_stage(
        sub,
        "caption-filter",
        "caption and filter the ingested images into <root>/round=K/capfilt/ with round K's captioner and filter",
    )
    _round_stage(sub, "assemble", "round K's bootstrapped dataset manifest into <root>/round=K/dataset/")
    _round_stage(sub, "eval", "evaluate round K's pre-trained model on the held-out set into <root>/round=K/eval/")
    rep = _round_stage(sub, "report", "round K's self-contained HTML report into <root>/round=K/eval/report.html")
    rep.add_argument("--samples", type=int, default=24, help="sample images shown (default 24)")
    boot = sub.add_parser(
        "bootstrap", help="the whole flow in-process (Prefect flow `capfilt`, local or RAY_ADDRESS Ray)"
    )
    _common(boot, root_required=False)
    cur = sub.add_parser(
        "curate",
        help="ingest, caption-filter, assemble and report with given checkpoints (capfilt.captioner and "
        "capfilt.filter: released BLIP .pth files or Hugging Face BLIP directories), no training: the flow "
        "`capfilt` with flow.mode=curate",
    )
    _common(cur, root_required=False)
    demo = sub.add_parser("demo", help="the embedded demo (make demo): bootstrap on flows/configs/demo.yaml")
    demo.add_argument("--root", default="runs/demo")
    demo.add_argument("--config", default=None, help="default: the shipped flows/configs/demo.yaml")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dep = sub.add_parser("deploy", help="register deployment `bootstrap` of flow `capfilt` on a process work pool")
    dep.add_argument(
        "--pool",
        default=None,
        help="work pool name (created as a process pool if missing); default: infra/prefect/prefect.yaml's",
    )
    _downstream_parsers(sub)
    return parser


def _downstream_parsers(sub) -> None:
    """The downstream tasks (pipelines/downstream.py): no run config; a checkpoint and an annotation file."""
    for task, what in (("vqa", "VQA (BLIP's vqa JSON)"), ("nlvr", "NLVR2 (BLIP's nlvr JSON)")):
        p = sub.add_parser(task, help=f"fine-tune or evaluate {what} from any checkpoint")
        p.add_argument("mode", choices=["finetune", "eval"])
        p.add_argument("--model", required=True, help="checkpoint: pre-trained (finetune) or the task's (eval)")
        p.add_argument("--ann", required=True, help="annotation JSON (path or fsspec URL)")
        p.add_argument("--images", required=True, help="image root the annotation paths are relative to")
        p.add_argument("--out", help="finetune: checkpoint directory to write; eval (vqa): result JSON to write")
        p.add_argument("--epochs", type=int, default=None, help="finetune: default the library's (VQA 5, NLVR2 10)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--lr", type=float, default=None, help="finetune: default the library's (VQA 2e-5, NLVR2 3e-5)")
        p.add_argument(
            "--no-augment",
            dest="augment",
            action="store_false",
            help="finetune: no random crops / RandAugment (for tiny images a crop can cut the object away)",
        )
        p.add_argument("--device", default=None, help="default: cuda when available")
        if task == "vqa":
            p.add_argument("--answer-list", help="eval: rank this JSON list of candidates instead of generating")
            p.add_argument("--k", type=int, default=128, help="candidates re-scored when ranking (default 128)")
    v = sub.add_parser(
        "video-retrieval", help="zero-shot text-video retrieval (BLIP's MSR-VTT JSON) with an image model"
    )
    v.add_argument("--model", required=True)
    v.add_argument("--ann", required=True)
    v.add_argument("--videos", required=True, help="local directory the annotation's video paths are relative to")
    v.add_argument("--frames", type=int, default=8, help="frames sampled uniformly per clip (default 8)")
    v.add_argument("--k", type=int, default=128, help="ITC candidates re-ranked by ITM (default 128)")
    v.add_argument("--device", default=None)
    t = sub.add_parser("synth-tasks", help="write tiny VQA / NLVR2 / video tasks drawn from the synthetic world")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--image-size", type=int, default=64)


def _run_downstream(args) -> dict:
    from pipelines import downstream as ds

    if args.command == "synth-tasks":
        from pipelines.world import write_tasks

        return write_tasks(args.out, seed=args.seed, image_size=args.image_size)
    if args.command == "video-retrieval":
        return ds.eval_video_retrieval(
            args.model, args.ann, args.videos, num_frames=args.frames, k=args.k, device=args.device
        )
    if args.mode == "finetune":
        if not args.out:
            raise ds.DownstreamError("finetune needs --out (the checkpoint directory to write)")
        fit = ds.finetune_vqa if args.command == "vqa" else ds.finetune_nlvr
        given = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
        return fit(
            args.model,
            args.ann,
            args.images,
            args.out,
            batch_size=args.batch_size,
            augment=args.augment,
            device=args.device,
            **given,
        )
    if args.command == "vqa":
        return ds.eval_vqa(
            args.model,
            args.ann,
            args.images,
            answer_list=args.answer_list,
            k=args.k,
            out=args.out,
            batch_size=args.batch_size,
            device=args.device,
        )
    return ds.eval_nlvr(args.model, args.ann, args.images, batch_size=args.batch_size, device=args.device)


def _pick(summary: dict, *keys: str) -> str:
    return json.dumps({k: summary.get(k) for k in keys})


def _synth(cfg, args) -> None:
    from pipelines.world import run_synth

    run_synth(cfg, args.root)


def _ingest(cfg, args) -> None:
    from pipelines.ingest import run_ingest

    run_ingest(cfg, args.root, retry_failed=args.retry_failed)


def _train(cfg, args) -> str:
    from pipelines.train import run_job

    summary = run_job(cfg, args.root, args.round, "pretrain" if args.command == "pretrain" else args.role)
    return _pick(summary, "job", "round", "model", "model_id", "final_step", "eval")


def _caption_filter(cfg, args) -> str:
    from pipelines.capfilt import run_caption_filter

    summary = run_caption_filter(cfg, args.root, args.round)
    return _pick(summary, "round", "images", "rows", "by_source", "by_status", "this_run")


def _assemble(cfg, args) -> str:
    from pipelines.assemble import run_assemble

    return json.dumps(run_assemble(cfg, args.root, args.round))


def _eval(cfg, args) -> str:
    from pipelines.evaluate import run_eval

    return _pick(run_eval(cfg, args.root, args.round), "round", "retrieval_r1", "caption_attribute_accuracy", "cider")


def _report(cfg, args) -> str:
    from pipelines.report import run_report

    return run_report(cfg, args.root, args.round, samples=args.samples)


def _bootstrap(cfg, args) -> str:
    from pipelines.storage import check_root_writable

    check_root_writable(args.root)  # before Prefect or Ray start: a bad root fails in a second
    from .bootstrap import capfilt as capfilt_flow

    try:
        summary = capfilt_flow(config=args.config, root=args.root, overrides=args.overrides)
    except Exception as err:  # noqa: BLE001 - Prefect has logged the traceback; end with one line
        raise FlowFailed(
            f"the flow failed: {type(err).__name__}: {err}\n"
            "Committed stages are kept: rerun the same command to resume."
        ) from err
    return "\n" + summary["report"]["text"]


class FlowFailed(Exception):
    """The bootstrap flow ended in a failed state (its traceback is in Prefect's log)."""


COMMANDS = {
    "synth": _synth,
    "ingest": _ingest,
    "pretrain": _train,
    "finetune": _train,
    "caption-filter": _caption_filter,
    "assemble": _assemble,
    "eval": _eval,
    "report": _report,
    "bootstrap": _bootstrap,
    "curate": _bootstrap,
    "demo": _bootstrap,
}
DOWNSTREAM = ("vqa", "nlvr", "video-retrieval", "synth-tasks")


def main(argv: list[str] | None = None) -> int:
    configure_environment()  # Ray's and Prefect's settings, before either is imported
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "deploy":
        from .deploy import deploy

        print(deploy(args.pool))
        return 0
    if args.command in DOWNSTREAM:
        try:
            print(json.dumps(_run_downstream(args)))
        except (StageError, FileNotFoundError, ValueError) as err:  # bad input or checkpoint: one line
            print(f"capfilt {args.command}: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command == "demo":
        args.config = args.config or shipped_config("demo.yaml")
    if args.command == "curate":
        args.overrides.append("flow.mode=curate")  # validated with the rest: missing checkpoints fail here
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"capfilt: {err}", file=sys.stderr)
        return 2
    if args.command in ("bootstrap", "curate") and not args.root:
        args.root = f"runs/{cfg.name}"
    try:
        out = COMMANDS[args.command](cfg, args)
    except PermissionError as err:  # an unusable run root
        print(f"capfilt {args.command}: {err}", file=sys.stderr)
        return 2
    except (StageError, FileNotFoundError, FlowFailed) as err:  # bad or missing input: one line, no traceback
        print(f"capfilt {args.command}: {err}", file=sys.stderr)
        return 1
    if out is not None:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
