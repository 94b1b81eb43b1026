"""The ``dereverb`` command line: plan, build, serve, ui, verify, inspect, train, evaluate,
enhance.

Every user error ends the command with one ``error:`` line naming the file or field and exit
status 2; ``--debug`` (or ``DEREVERB_DEBUG=1``) shows the traceback instead. Modules are
imported by the commands that need them, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import errno
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn


class CommandError(Exception):
    """A command-line usage error the parser cannot see; the message names the option."""


# The user-error classes, by module: an exception can only be an instance of a class whose
# module is imported, so classifying an error never imports anything.
USER_ERRORS = {
    "dereverb_data.manifest": ("ManifestError",),
    "dereverb_data.corpus": ("AudioError",),
    "dereverb_data.store_format": ("StoreError",),
    "dereverb_data.rooms": ("PlacementError",),
    "training.config": ("TrainConfigError",),
    "flows.runners": ("ClusterError",),
    "training.enhance": ("EnhanceError",),
    "training.train": ("RunFolderError",),
    "training.checkpoint": ("CheckpointError",),
}

# Operating-system errors a user can act on (a full disk, a read-only folder, a wrong path).
USER_ERRNOS = {
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
}


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, CommandError):
        return True
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return True  # also when raised with a message only (no errno), as zarr does
    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
        return True
    for module_name, names in USER_ERRORS.items():
        module = sys.modules.get(module_name)
        classes = tuple(getattr(module, n) for n in names if hasattr(module, n))
        if classes and isinstance(exc, classes):
            return True
    return False


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for a user error (itself or what it was raised from), else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_user_error(current):
            if isinstance(current, OSError) and current.strerror:
                where = current.filename or ""
                return f"{where}: {current.strerror}" if where else current.strerror
            return str(current)
        current = current.__cause__ or current.__context__
    return None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``, else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _enhance_phase(text: str) -> str:
    """``--phase`` of enhance; ``reverberant``, its old name for ``model``, still works."""
    if text == "reverberant":
        # The old name said the opposite of what it did for complex models (they keep their
        # own phase), so it is only an alias now, with a warning.
        print(
            "warning: --phase reverberant is deprecated; it means --phase model "
            "(the model's own output)",
            file=sys.stderr,
        )
        return "model"
    return text


def cmd_plan(args: argparse.Namespace) -> int:
    from dereverb_data.build import plan_inputs
    from dereverb_data.manifest import load_manifest

    manifest = load_manifest(args.manifest, args.corpus)
    plan = plan_inputs(manifest)  # what a build plans: corpus, measured RIRs, noise files
    print(json.dumps(plan.summary(), indent=2))
    for q in plan.quarantined:
        print(f"quarantined: {q.reason}")
    if args.show:
        print(f"\n{'example':<32} {'split':<6} {'room':<14} {'rir':<20} {'level dBFS':>10}")
        for e in plan.examples_between(0, min(args.show, plan.n_examples)):
            level = f"{e.rms_dbfs:.1f}" if e.rms_dbfs is not None else "-"
            print(f"{e.example_id:<32} {e.split:<6} {e.room_id:<14} {e.rir_id:<20} {level:>10}")
    return 0


def _watch(store_url: str, rir_cache: str, job: threading.Thread) -> None:
    """Progress bars from what the build leaves in the store, so they work for any executor.

    The plan is loaded from the store once the build has stored it (never planned here), and
    progress is read from one listing each of the RIR bank and the shard markers per poll.
    """
    from tqdm import tqdm

    from dereverb_data.build import load_plan
    from dereverb_data.rir_bank import RirBank
    from dereverb_data.store import DatasetStore, ShardProgress
    from dereverb_data.store_format import PLAN_FILE

    store = DatasetStore(store_url)
    bars: dict[str, tqdm] = {}
    plan = None
    progress = None
    rir_ids: set[str] = set()
    stamp = None
    while job.is_alive() or plan is not None:
        # One stat a poll: a resume replaces the plan stored before it with its own.
        now = _plan_stamp(store, PLAN_FILE)
        if now is not None and now != stamp:
            try:
                plan, stamp = load_plan(store_url), now
            except (OSError, ValueError):
                pass  # being written, or an old store's: next poll
            else:
                rir_ids = set(plan.rir_ids())
                fingerprints = plan.columns["shard_fingerprint"].astype("U").tolist()
                progress = ShardProgress(store, fingerprints)
                for bar in bars.values():
                    bar.close()
                bars["rirs"] = tqdm(total=len(rir_ids), desc="RIRs simulated", unit="rir")
                bars["shards"] = tqdm(total=plan.n_shards, desc="shards rendered", unit="shard")
        if plan is not None and progress is not None:
            rirs = len(RirBank(rir_cache).rir_ids() & rir_ids)
            shards = progress.done()
            for name, value in (("rirs", rirs), ("shards", shards)):
                bars[name].update(value - bars[name].n)
            if not job.is_alive():
                break
        time.sleep(0.5)
    for bar in bars.values():
        bar.close()


def _plan_stamp(store, relative: str) -> tuple | None:
    """What identifies the stored plan's file now (None while there is none)."""
    try:
        info = store.fs.info(f"{store.root}/{relative}")
    except (FileNotFoundError, OSError):
        return None
    return tuple(sorted((k, str(v)) for k, v in info.items()))


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
    try:
        if progress:
            _watch(store_url, rir_cache, job)
        job.join()
    except KeyboardInterrupt:
        _stop_build(job)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["report"]


def _stop_build(job: threading.Thread, grace_s: float = 20.0) -> None:
    """Ctrl-C during a build: stop the workers in order and let the flow's thread end.

    A shard counts as built only once its done-marker is written after its data, so what is
    finished stays and the same command resumes. The user asked to stop: the tasks' failures that
    follow are not news, so logging ends here (before, the flow's thread went on logging
    while the interpreter shut down, printing pages of logging errors and worker tracebacks).
    """
    import logging

    logging.disable(logging.CRITICAL)
    from .local_dask import close_local_clusters

    close_local_clusters()
    job.join(grace_s)


def _preflight_build(args: argparse.Namespace) -> None:
    """Everything a build can check before it starts a server or a cluster."""
    from dereverb_data.manifest import load_manifest
    from dereverb_data.preflight import check_corpus, check_same_dataset, check_store_target

    manifest = load_manifest(args.manifest, args.corpus)
    check_corpus(manifest)
    check_store_target(args.store)
    check_same_dataset(args.store, manifest, args.replace)
    if args.dask_address:
        from .runners import check_scheduler

        check_scheduler(args.dask_address)


def cmd_build(args: argparse.Namespace) -> int:
    from dereverb_data.build import default_rir_cache

    _preflight_build(args)
    from .build import run_build
    from .server import is_temporary, prefect_server

    rir_cache = args.rir_cache or default_rir_cache(args.store)
    corpus = str(Path(args.corpus).resolve()) if args.corpus else None
    from .runners import starts_local_cluster

    if starts_local_cluster(args.workers, args.dask_address):
        from .local_dask import start_worker_forkserver

        # Here, in the main thread, so that the workers ignore Ctrl-C (the flow's thread
        # cannot set that up); its imports overlap the Prefect server's start.
        start_worker_forkserver()
    then_train = None
    if args.then_train:
        from training.config import load_train_config

        load_train_config(args.then_train)  # a bad training config fails before the build
        out = args.train_out or str(Path("runs") / Path(args.store).stem)
        then_train = {"config_path": str(Path(args.then_train).resolve()), "out_dir": out}
    started = time.time()
    with _resume_hint(args.store), prefect_server() as api:
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
                replace=args.replace,
            ),
            args.store,
            rir_cache,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
        # Only a server that outlives this command has a page worth linking to.
        link = None if is_temporary(api) else _build_run_link(args.store, started)
    summary = report["summary"]
    print(
        f"built {args.store}: {summary['examples']} examples, {summary['hours']:.3f} h, "
        f"{summary['shards']} shards, {summary['size_on_disk_bytes'] / 1e6:.1f} MB"
    )
    print("counts: " + ", ".join(f"{k} {v}" for k, v in report["counts"].items()))
    for item in report["quarantined"]:
        print(f"quarantined: {item['reason']}")
    for source in report.get("clipped", []):
        print(f"clipped source (kept, flagged): {source}")
    if report.get("repaired_shards"):
        print(f"repaired shards: {report['repaired_shards']}")
    for warning in report.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if "training" in report:
        print(f"trained into {then_train['out_dir']}: " + _format_metrics(report["training"]))
    if link:
        print(f"Prefect run (its summary under Artifacts): {link}")
    return 0


def _build_run_link(store: str, started: float) -> str | None:
    """The UI page of the build-dataset run this command just finished, or None.

    flows/build.py returns no run id, so it is looked up: the newest completed build-dataset
    run of this store that started after this command (one writer per store, so no other
    build of it can have completed since). Must run while the Prefect settings point at the
    server.
    """
    from datetime import UTC, datetime, timedelta

    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.utilities.urls import url_for

    # A margin for a remote server's clock; the store and the state narrow it down.
    after = datetime.fromtimestamp(started, UTC) - timedelta(minutes=1)
    # A link we cannot find must not fail a finished build.
    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["build-dataset"])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after)),
            sort=FlowRunSort.START_TIME_DESC,
            limit=20,
        )
        for run in runs:
            if run.parameters.get("store_url") == store and run.state and run.state.is_completed():
                return url_for("flow-run", obj_id=run.id)
    return None


@contextlib.contextmanager
def _resume_hint(store: str) -> Iterator[None]:
    """A full disk (or file-size limit) mid-build: say that nothing built is lost."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise CommandError(
            f"{exc.filename or store}: {exc.strerror}; every shard finished so far is kept: "
            "free some space and rerun the same command to resume"
        ) from exc


def _format_metrics(metrics: dict) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items())
    )


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_train_config
    from training.train import train

    overrides = {"model": args.model, "steps": args.steps, "device": args.device}
    config = load_train_config(args.config, overrides)
    metrics = train(config, args.data, args.out)
    print(f"trained {config.model} into {args.out}: {_format_metrics(metrics)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if not args.data and not (args.speech and args.rirs):
        raise CommandError("evaluate needs --data STORE, or --speech DIR with --rirs DIR")
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

    from training.enhance import (
        EnhanceError,
        enhance_file,
        model_spec_fn,
        plan_outputs,
        reconstruct_fn,
    )
    from training.inference import load_checkpoint

    pairs = plan_outputs(args.inputs, args.out)  # every output decided before any is written
    model, config, rate = load_checkpoint(args.checkpoint)
    spec_fn = reconstruct_fn(model_spec_fn(model, torch.device("cpu")), args.phase, config)
    failures = 0
    for source, destination in pairs:
        try:
            written = enhance_file(
                spec_fn, source, destination, rate, config, progress=sys.stderr.isatty()
            )
            print(f"{source} -> {written}")
        except (EnhanceError, FileNotFoundError) as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
    return 2 if failures else 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.packaged import export_model

    written = export_model(args.checkpoint, args.out, args.dtype)
    print(f"exported {args.checkpoint} -> {written} ({written.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dereverb_data.manifest import load_manifest

    load_manifest(args.manifest)
    if args.dask_address:
        from .runners import check_scheduler

        check_scheduler(args.dask_address)
    import prefect

    from .deployments import deployments
    from .local_dask import served_cluster
    from .server import prefect_server
    from .train import train_deployment

    with prefect_server() as api, served_cluster(args.workers, args.dask_address) as address:
        served = deployments(args.manifest, args.store, args.cron or None, args.workers, address)
        if args.train_config:
            out = args.train_out or str(Path("runs") / Path(args.store).stem)
            served.append(train_deployment(args.store, out, args.train_config))
        names = ", ".join(f"{d.flow_name}/{d.name}" for d in served)
        print(f"serving {names} against {api} (Ctrl-C to stop)", flush=True)
        prefect.serve(*served, limit=1, print_starting_message=False)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Run the persistent Prefect server in the foreground until Ctrl-C (or print the one
    that already runs): while it runs, build and serve use it, so their runs stay visible."""
    import signal

    from .server import (
        PersistentServerError,
        find_persistent_server,
        persistent_home,
        persistent_server,
        ui_url,
    )

    home = persistent_home()
    running = find_persistent_server(home)
    if running:
        print(f"Prefect UI already running at {ui_url(running)} (API {running}, home {home})")
        return 0

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the same orderly stop as Ctrl-C: the server, then this

    # A closed terminal or `kill` must stop the server and remove the state file too.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        with persistent_server(args.port, home) as (process, api):
            print(f"Prefect UI at {ui_url(api)} (API {api}, home {home})")
            print("dereverb build and serve use this server while it runs; Ctrl-C to stop")
            sys.stdout.flush()
            code = process.wait()  # returns only if the server stopped by itself
    except PersistentServerError as exc:
        raise CommandError(str(exc)) from exc
    except KeyboardInterrupt:
        print("Prefect UI stopped", file=sys.stderr)
        return 0
    raise RuntimeError(f"the Prefect server stopped by itself (code {code}); see {home}/server.log")


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
    if args.plot and not 0 <= args.example < description["examples"]:
        n = description["examples"]
        raise CommandError(
            f"--example {args.example}: {args.store} has {n} examples (0 to {n - 1})"
        )
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    if args.plot:
        plot_store(args.store, args.plot, args.example)
        print(f"plot written to {args.plot}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


MODEL_HELP = (
    "checkpoint.pt of a training run, or a model exported by `dereverb export` (.safetensors); "
    "default: the packaged model (training/default_model/MODEL_CARD.md)"
)


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show full tracebacks and every log line (also: DEREVERB_DEBUG=1)",
    )
    parser = _Parser(
        prog="dereverb",
        description="Reverberant speech datasets, models and evaluation.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    plan = command("plan", "validate a manifest and print its plan (simulates nothing)")
    plan.add_argument("manifest", help="dataset manifest (YAML)")
    plan.add_argument("--corpus", help="corpus folder (replaces a folder corpus's corpus.path)")
    plan.add_argument(
        "--show", type=_non_negative_int, default=0, metavar="N", help="print the first N examples"
    )
    plan.set_defaults(func=cmd_plan)

    build = command("build", "build, resume or update a store from a manifest")
    build.add_argument("manifest", help="dataset manifest (YAML)")
    build.add_argument("--store", required=True, help="store path or URL (e.g. s3://bucket/x.zarr)")
    build.add_argument("--corpus", help="corpus folder (replaces a folder corpus's corpus.path)")
    build.add_argument("--rir-cache", help="RIR bank path or URL (default: inside the store)")
    build.add_argument(
        "--workers", type=_positive_int, help="worker processes (1: in-process; default: cores)"
    )
    build.add_argument("--dask-address", help="use an existing Dask scheduler, tcp://HOST:PORT")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.add_argument("--repair", action="store_true", help="rebuild shards that fail verify")
    build.add_argument(
        "--replace",
        action="store_true",
        help="the store holds another dataset (name, seed or corpus): rebuild it as this one",
    )
    build.add_argument("--then-train", metavar="CONFIG", help="train on the store when built")
    build.add_argument("--train-out", metavar="RUN_DIR", help="run folder for --then-train")
    build.add_argument(
        "--break-lock",
        action="store_true",
        help="take over a lock held from another host, or a lock file that is unreadable",
    )
    build.set_defaults(func=cmd_build)

    serve = command("serve", "serve build/regenerate(/train) deployments")
    serve.add_argument("manifest", help="dataset manifest (YAML) the deployments build")
    serve.add_argument("--store", required=True, help="store path or URL the deployments build")
    serve.add_argument("--cron", default="0 2 * * *", help="nightly build schedule; '' for none")
    serve.add_argument(
        "--workers", type=_positive_int, help="local worker processes (default: cores)"
    )
    serve.add_argument("--dask-address", help="use an existing Dask scheduler, tcp://HOST:PORT")
    serve.add_argument("--train-config", help="also serve a train-model deployment (YAML)")
    serve.add_argument("--train-out", metavar="RUN_DIR", help="run folder of the train deployment")
    serve.set_defaults(func=cmd_serve)

    ui = command(
        "ui",
        "run a persistent Prefect server and UI until Ctrl-C; build and serve use it meanwhile",
    )
    ui.add_argument(
        "--port", type=_positive_int, default=4200, help="port on 127.0.0.1 (default: 4200)"
    )
    ui.set_defaults(func=cmd_ui)

    verify = command("verify", "recompute checksums and check the index")
    verify.add_argument("store", help="store path or URL")
    verify.set_defaults(func=cmd_verify)

    train = command("train", "train (or resume) a model on a store")
    train.add_argument("--data", required=True, help="store path or URL")
    train.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    train.add_argument("--model", help="model name (default: the config's, else bsrnn_lite)")
    train.add_argument(
        "--steps", type=_positive_int, help="optimizer steps (replaces the config's)"
    )
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto")
    train.add_argument("--config", help="YAML file of TrainConfig fields")
    train.set_defaults(func=cmd_train)

    evaluate = command("evaluate", "score a checkpoint next to input, WPE, oracle")
    evaluate.add_argument("--checkpoint", help=MODEL_HELP)
    evaluate.add_argument("--out", required=True, help="folder for the CSV, summary and plots")
    evaluate.add_argument("--data", help="store to evaluate on (or --speech with --rirs)")
    evaluate.add_argument("--split", default="test", help="store split (default: test)")
    evaluate.add_argument("--speech", help="folder of clean speech (real-room check)")
    evaluate.add_argument("--rirs", help="folder of measured RIRs (real-room check)")
    evaluate.add_argument(
        "--phase",
        default="model",
        choices=["model", "fgla", "gd"],
        help="model: its own output; fgla/gd: its magnitude with reconstructed phase",
    )
    evaluate.add_argument("--limit", type=_positive_int, help="at most N store examples")
    evaluate.add_argument(
        "--pairs-per-rir",
        type=_positive_int,
        default=4,
        help="utterances per measured RIR (default: 4)",
    )
    evaluate.set_defaults(func=cmd_evaluate)

    enhance = command("enhance", "dereverberate your own recordings")
    enhance.add_argument("--checkpoint", help=MODEL_HELP)
    enhance.add_argument("inputs", nargs="+", metavar="IN", help="audio files (wav, flac, ogg)")
    enhance.add_argument(
        "--out",
        required=True,
        help="output folder; each IN is written there under its own file name. Inputs with "
        "the same file name, or an output that is an input (also through links), are refused "
        "before anything is written",
    )
    enhance.add_argument(
        "--phase",
        default="model",
        type=_enhance_phase,
        choices=["model", "fgla", "gd"],
        help="model: its own output (complex models keep their own phase, magnitude models "
        "the reverberant one); fgla/gd: its magnitude with reconstructed phase",
    )
    enhance.set_defaults(func=cmd_enhance)

    inspect = command("inspect", "describe a built store")
    inspect.add_argument("store", help="store path or URL")
    inspect.add_argument(
        "--plot", metavar="FILE.png", help="draw label histograms and spectrograms"
    )
    inspect.add_argument(
        "--example", type=_non_negative_int, default=0, help="example to draw (index row)"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=cmd_inspect)

    export = command("export", "write a checkpoint's model to one .safetensors file")
    export.add_argument("checkpoint", help="checkpoint.pt of a training run")
    export.add_argument("--out", required=True, help="the model file to write (NAME.safetensors)")
    export.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "float32"],
        help="stored weight precision (default float16: half the size; computes in float32)",
    )
    export.set_defaults(func=cmd_export)
    return parser


def _debug_requested(args: argparse.Namespace) -> bool:
    flag = os.environ.get("DEREVERB_DEBUG", "").strip().lower()
    return bool(getattr(args, "debug", False)) or flag not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = _debug_requested(args)
    if not debug:
        from .console import quiet_console

        quiet_console()  # before Prefect is imported, here and in the processes started
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        message = user_error_message(exc)
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
            return 2
        print(
            f"error: unexpected {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
