"""The ``dereverb`` command line: plan, build, inspect (and more as the product grows)."""

from __future__ import annotations

import argparse
import contextvars
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dereverb_data.corpus import AudioError
from dereverb_data.manifest import ManifestError, load_manifest
from dereverb_data.rooms import PlacementError
from dereverb_data.store import StoreError

USER_ERRORS = (ManifestError, AudioError, StoreError, PlacementError, FileNotFoundError)


def _user_errors() -> tuple[type[Exception], ...]:
    from .train import TrainConfigError

    return (*USER_ERRORS, TrainConfigError)


def cmd_plan(args: argparse.Namespace) -> int:
    from dereverb_data.corpus import scan_corpus
    from dereverb_data.plan import make_plan

    manifest = load_manifest(args.manifest, args.corpus)
    utterances, quarantined = scan_corpus(manifest.corpus, manifest.sample_rate)
    plan = make_plan(manifest, utterances, quarantined)
    print(json.dumps(plan.summary(), indent=2))
    for q in plan.quarantined:
        print(f"quarantined: {q.reason}")
    if args.show:
        print(f"\n{'example':<32} {'split':<6} {'room':<14} {'rir':<20} {'level dBFS':>10}")
        for e in plan.examples[: args.show]:
            level = f"{e.rms_dbfs:.1f}" if e.rms_dbfs is not None else "-"
            print(f"{e.example_id:<32} {e.split:<6} {e.room_id:<14} {e.rir_id:<20} {level:>10}")
    return 0


def _watch(store_url: str, rir_cache: str, job: threading.Thread) -> None:
    """Progress bars from what the build leaves in the store, so they work for any executor."""
    from tqdm import tqdm

    from dereverb_data.build import load_plan
    from dereverb_data.rir_bank import RirBank
    from dereverb_data.store import BUILD_DIR, DatasetStore

    store = DatasetStore(store_url)
    bars: dict[str, tqdm] = {}
    plan = None
    while job.is_alive() or plan is not None:
        if (
            plan is None
            and store.fs.exists(f"{store.root}/{BUILD_DIR}/plan.json")
            and store.exists()
        ):
            try:
                plan = load_plan(store_url)
            except (OSError, ValueError):
                plan = None
            if plan is not None:
                bars["rirs"] = tqdm(total=len(plan.rirs), desc="RIRs simulated", unit="rir")
                bars["shards"] = tqdm(total=len(plan.shards), desc="shards rendered", unit="shard")
        if plan is not None:
            rirs = len(RirBank(rir_cache).rir_ids() & set(plan.rirs))
            shards = sum(store.shard_is_done(s.shard_id, s.fingerprint) for s in plan.shards)
            for name, value in (("rirs", rirs), ("shards", shards)):
                bars[name].update(value - bars[name].n)
            if not job.is_alive():
                break
        time.sleep(0.5)
    for bar in bars.values():
        bar.close()


def _run_watched(work: Callable[[], dict], store_url: str, rir_cache: str, progress: bool) -> dict:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["report"] = work()
        except BaseException as exc:  # re-raised in the main thread below
            outcome["error"] = exc

    # Copy the context: the Prefect settings (API URL) live in context variables.
    context = contextvars.copy_context()
    job = threading.Thread(target=context.run, args=(target,), daemon=True)
    job.start()
    if progress:
        _watch(store_url, rir_cache, job)
    job.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["report"]


def cmd_build(args: argparse.Namespace) -> int:
    from dereverb_data.build import default_rir_cache

    from .build import run_build
    from .server import prefect_server

    load_manifest(args.manifest, args.corpus)  # fail on a bad manifest before starting anything
    rir_cache = args.rir_cache or default_rir_cache(args.store)
    corpus = str(Path(args.corpus).resolve()) if args.corpus else None
    then_train = None
    if args.then_train:
        from .train import load_train_config

        load_train_config(args.then_train)  # a bad training config fails before the build
        out = args.train_out or str(Path("runs") / Path(args.store).stem)
        then_train = {"config_path": str(Path(args.then_train).resolve()), "out_dir": out}
    with prefect_server():
        report = _run_watched(
            lambda: run_build(
                args.manifest,
                args.store,
                rir_cache,
                args.workers,
                args.dask_address,
                corpus,
                break_lock=args.break_lock,
                repair=args.repair,
                then_train=then_train,
            ),
            args.store,
            rir_cache,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    summary = report["summary"]
    print(
        f"built {args.store}: {summary['examples']} examples, {summary['hours']:.3f} h, "
        f"{summary['shards']} shards, {summary['size_on_disk_bytes'] / 1e6:.1f} MB"
    )
    print("counts: " + ", ".join(f"{k} {v}" for k, v in report["counts"].items()))
    for item in report["quarantined"]:
        print(f"quarantined: {item['reason']}")
    if report.get("repaired_shards"):
        print(f"repaired shards: {report['repaired_shards']}")
    if "training" in report:
        print(f"trained into {then_train['out_dir']}: " + _format_metrics(report["training"]))
    return 0


def _format_metrics(metrics: dict) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items())
    )


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import train

    from .train import load_train_config

    overrides = {"model": args.model, "steps": args.steps, "device": args.device}
    config = load_train_config(args.config, overrides)
    metrics = train(config, args.data, args.out)
    print(f"trained {config.model} into {args.out}: {_format_metrics(metrics)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    table = evaluate(
        args.checkpoint,
        args.out,
        data=args.data,
        split=args.split,
        speech=args.speech,
        rirs=args.rirs,
        phase=args.phase,
        limit=args.limit,
        pairs_per_rir=args.pairs_per_rir,
    )
    print(table)
    print(f"per-example CSV, summary, plots and example audio in {args.out}")
    return 0


def cmd_enhance(args: argparse.Namespace) -> int:
    import torch

    from training.enhance import EnhanceError, enhance_file, model_spec_fn, reconstruct_fn
    from training.evaluate import load_checkpoint

    model, config, rate = load_checkpoint(args.checkpoint)
    spec_fn = reconstruct_fn(model_spec_fn(model, torch.device("cpu")), args.phase, config)
    out_dir = Path(args.out)
    failures = 0
    for source in map(Path, args.inputs):
        try:
            written = enhance_file(
                spec_fn,
                source,
                out_dir / source.name,
                rate,
                config,
                progress=sys.stderr.isatty(),
            )
            print(f"{source} -> {written}")
        except (EnhanceError, FileNotFoundError) as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
    return 2 if failures else 0


def cmd_serve(args: argparse.Namespace) -> int:
    import prefect

    from .deployments import deployments
    from .local_dask import served_cluster
    from .server import prefect_server
    from .train import train_deployment

    load_manifest(args.manifest)
    with prefect_server() as api, served_cluster(args.workers, args.dask_address) as address:
        served = deployments(args.manifest, args.store, args.cron or None, args.workers, address)
        if args.train_config:
            out = args.train_out or str(Path("runs") / Path(args.store).stem)
            served.append(train_deployment(args.store, out, args.train_config))
        names = ", ".join(f"{d.flow_name}/{d.name}" for d in served)
        print(f"serving {names} against {api} (Ctrl-C to stop)", flush=True)
        prefect.serve(*served, limit=1, print_starting_message=False)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from dereverb_data.verify import verify_store

    report = verify_store(args.store)
    for line in report.lines():
        print(line)
    if report.ok:
        print(f"ok: {report.shards_checked} shards match their checksums; index consistent")
        return 0
    print(
        f"{len(report.damaged)} damaged shard(s), {len(report.problems)} other problem(s); "
        "`dereverb build MANIFEST --store STORE --repair` rebuilds damaged shards"
    )
    return 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from dereverb_data.inspect import describe_store, format_description, plot_store

    description = describe_store(args.store)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    if args.plot:
        plot_store(args.store, args.plot, args.example)
        print(f"plot written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dereverb", description="Reverberant speech datasets, models and evaluation."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="validate a manifest and print its plan (simulates nothing)")
    plan.add_argument("manifest")
    plan.add_argument("--corpus", help="corpus folder (replaces corpus.path in the manifest)")
    plan.add_argument("--show", type=int, default=0, metavar="N", help="print the first N examples")
    plan.set_defaults(func=cmd_plan)

    build = sub.add_parser("build", help="build, resume or update a store from a manifest")
    build.add_argument("manifest")
    build.add_argument("--store", required=True, help="store path or URL (e.g. s3://bucket/x.zarr)")
    build.add_argument("--corpus", help="corpus folder (replaces corpus.path in the manifest)")
    build.add_argument("--rir-cache", help="RIR bank path or URL (default: inside the store)")
    build.add_argument(
        "--workers", type=int, help="worker processes (1: in-process; default: cores)"
    )
    build.add_argument("--dask-address", help="use an existing Dask scheduler, tcp://HOST:PORT")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.add_argument("--repair", action="store_true", help="rebuild shards that fail verify")
    build.add_argument("--then-train", metavar="CONFIG", help="train on the store when built")
    build.add_argument("--train-out", metavar="RUN_DIR", help="run folder for --then-train")
    build.add_argument(
        "--break-lock", action="store_true", help="take over a lock held from another host"
    )
    build.set_defaults(func=cmd_build)

    serve = sub.add_parser("serve", help="serve build/regenerate(/train) deployments")
    serve.add_argument("manifest")
    serve.add_argument("--store", required=True)
    serve.add_argument("--cron", default="0 2 * * *", help="nightly build schedule; '' for none")
    serve.add_argument("--workers", type=int)
    serve.add_argument("--dask-address")
    serve.add_argument("--train-config", help="also serve a train-model deployment")
    serve.add_argument("--train-out", metavar="RUN_DIR")
    serve.set_defaults(func=cmd_serve)

    verify = sub.add_parser("verify", help="recompute checksums and check the index")
    verify.add_argument("store")
    verify.set_defaults(func=cmd_verify)

    train = sub.add_parser("train", help="train (or resume) a model on a store")
    train.add_argument("--data", required=True, help="store path or URL")
    train.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    train.add_argument("--model", help="model name (default: the config's, else bsrnn_lite)")
    train.add_argument("--steps", type=int)
    train.add_argument("--device", choices=["auto", "cpu", "cuda"])
    train.add_argument("--config", help="YAML file of TrainConfig fields")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="score a checkpoint next to input, WPE, oracle")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--out", required=True)
    evaluate.add_argument("--data", help="store to evaluate on")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--speech", help="folder of clean speech (real-room check)")
    evaluate.add_argument("--rirs", help="folder of measured RIRs (real-room check)")
    evaluate.add_argument("--phase", default="model", choices=["model", "fgla", "gd"])
    evaluate.add_argument("--limit", type=int, help="at most N store examples")
    evaluate.add_argument("--pairs-per-rir", type=int, default=4)
    evaluate.set_defaults(func=cmd_evaluate)

    enhance = sub.add_parser("enhance", help="dereverberate your own recordings")
    enhance.add_argument("--checkpoint", required=True)
    enhance.add_argument("inputs", nargs="+", metavar="IN")
    enhance.add_argument("--out", required=True, help="output folder (never the input's)")
    enhance.add_argument(
        "--phase",
        default="reverberant",
        choices=["reverberant", "fgla", "gd"],
        help="reverberant: the model's own output (complex models keep their phase)",
    )
    enhance.set_defaults(func=cmd_enhance)

    inspect = sub.add_parser("inspect", help="describe a built store")
    inspect.add_argument("store")
    inspect.add_argument(
        "--plot", metavar="FILE.png", help="draw label histograms and spectrograms"
    )
    inspect.add_argument("--example", type=int, default=0, help="example to draw (index row)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
