"""Loader throughput: crops per second from the zarr store against its limit and its consumer.

Four rates, all in crops per second, for the same crops (sample indices ``0 .. batches *
batch_size - 1`` of ``training.data.sample_crop`` with one seed, so every row reads exactly the
same frames):

- **store, N workers**: ``training.data.CropDataset`` + ``crop_loader``, the loader training
  uses, reading the zarr store (one row per ``--workers`` entry, 0 and 2 by default);
- **in-memory**: the same ``CropDataset.__getitem__`` and DataLoader (0 workers), but reading
  from numpy copies of the store's arrays instead of zarr: the limit, what the loader would
  give if reading the store cost nothing. The copy is the whole arrays when they fit in
  ``--resident-mb``, else only the frames of the crops the run uses (printed);
- **training consumption**: a training step (forward, loss, backward, gradient clipping,
  AdamW and scheduler step, exactly as ``training/train.py``'s loop) of ``--model`` on those
  batches, already in memory, on the CPU with torch threads as training leaves them (torch's
  default; ``--threads`` overrides);
- **training fed by the store**: the same steps fed by the store loader with the largest
  worker count, all competing for the same cores as in a real run (the loader is not the
  bottleneck if this equals training consumption).

With ``--object-store`` it measures instead the same crops from the local store and from a
copy of it on S3 (moto's server in its own process on 127.0.0.1, reached through
``AWS_ENDPOINT_URL`` like any S3 endpoint), in the same run, each with the loader as it is
("now": ``training.data.ShardReader``, one ranged GET per signal per crop, and workers that
reopen only the arrays) and as it was ("before": plain zarr reads, the whole index read again
by every worker), and prints crops/s, S3 requests per crop (counted from the server's request
log, worker start-up included) and the S3/local ratios. Loopback S3 has no network latency
but costs CPU on the same cores (the server is Python); on a real object store each request
waits a round trip instead, so requests per crop matter more there.

Goals: store / in-memory >= 0.8 (the store costs little over RAM) and store / consumption
> 1 (the loader is never the bottleneck). Rates exclude the first batch (worker start-up and
first-touch costs; the start-up time is printed separately). If CUDA is available, GPU
training steps (autocast as in training) are timed too and compared with the store loader.
The load average is printed: on a shared machine the numbers are an order of magnitude.

    python benchmarks/loader_throughput.py --store stores/demo.zarr \\
        [--crop-frames 192 --batch-size 8 --batches 50 --workers 0,2 --model bsrnn_lite]
    python benchmarks/loader_throughput.py --store stores/demo.zarr --object-store
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dereverb_data.store_format  # noqa: E402
import training.data  # noqa: E402
from dereverb_data.store_format import SIGNALS, decode, open_store  # noqa: E402
from training.data import CropDataset, crop_loader  # noqa: E402
from training.losses import DereverbLoss  # noqa: E402
from training.models import build_model, count_parameters  # noqa: E402
from training.train import TrainConfig, lr_factor, model_arguments  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The in-memory limit: CropDataset reading numpy arrays instead of zarr


class ResidentFrames:
    """Duck-types ``StoreReader.read`` from numpy copies of the stored (undecoded) frames.

    ``whole=True``: the full arrays. Otherwise only the frame ranges ``ranges`` (each a
    ``(start, stop)`` of a crop), looked up by exact range. Frames stay in the storage dtype and
    are decoded on every read, as ``StoreReader.read`` does, so only the zarr read differs.
    """

    def __init__(self, url: str, ranges: list[tuple[int, int]], resident_mb: float):
        store = open_store(url)
        total = sum(store.arrays[name].nbytes for name in SIGNALS)
        self.whole = total <= resident_mb * 2**20
        if self.whole:
            self.arrays = {name: store.arrays[name][...] for name in SIGNALS}
        else:
            self.crops = {
                (name, a, b): store.arrays[name][a:b] for name in SIGNALS for a, b in set(ranges)
            }
        self.nbytes = (
            sum(a.nbytes for a in self.arrays.values())
            if self.whole
            else sum(a.nbytes for a in self.crops.values())
        )
        self.store_nbytes = total

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        if self.whole:
            return decode(self.arrays[name][start:stop])
        return decode(self.crops[(name, start, stop)])


class _Holder:
    """Stands in for ``training.data._LazyStore``: ``.store`` is what ``__getitem__`` reads."""

    def __init__(self, store: ResidentFrames):
        self.store = store


def in_memory_dataset(dataset: CropDataset, resident_mb: float, n_samples: int) -> CropDataset:
    """A copy of ``dataset`` (same crops, same ``__getitem__``) that reads from RAM."""
    ranges = []
    for i in range(n_samples):
        _, start, length = dataset.crop(i)
        ranges.append((start, start + length))
    resident = CropDataset(dataset._lazy.url, dataset.split, dataset.crop_frames, dataset.seed)
    resident._lazy = _Holder(ResidentFrames(dataset._lazy.url, ranges, resident_mb))
    return resident


# ---------------------------------------------------------------------------------------------
# Timing


def time_loader(loader, keep: bool = False) -> dict[str, Any]:
    """Iterate ``loader`` to the end: start-up (to the first batch) and crops/s after it.

    ``keep``: also return the batches (otherwise they are dropped as they come).
    """
    started = time.perf_counter()
    batches, first, crops_after_first = [], None, 0
    for batch in loader:
        if first is None:
            first = time.perf_counter()
        else:
            crops_after_first += len(batch["row"])
        if keep:
            batches.append(batch)
    done = time.perf_counter()
    return {
        "startup_s": first - started,
        "crops_per_s": crops_after_first / max(done - first, 1e-9),
        "batches": batches,
    }


class TrainStep:
    """One step of ``training/train.py``'s loop on a batch, for a fresh model of ``config``."""

    def __init__(self, config: TrainConfig, n_freq: int, stft, device: torch.device):
        torch.manual_seed(config.seed)
        self.config, self.device = config, device
        self.model = build_model(config.model, n_freq, **model_arguments(config)).to(device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = LambdaLR(self.optimizer, lambda step: lr_factor(step, config))
        self.use_amp = config.amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16
        if self.use_amp and not torch.cuda.is_bf16_supported():
            self.amp_dtype = torch.float16
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16
        )
        self.criterion = DereverbLoss(
            config.magnitude_weight,
            config.complex_weight,
            config.mrstft_weight,
            exponent=config.compress_exponent,
            stft=stft,
        )
        self.model.train()

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        reverberant = batch["reverberant"].to(self.device, non_blocking=True)
        clean = batch["clean"].to(self.device, non_blocking=True)
        mask = batch["mask"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            estimate = self.model(reverberant)
        loss, _ = self.criterion(estimate, clean, mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(step: TrainStep, batches, warmup: int) -> dict[str, float]:
    """Crops/s of ``step`` over ``batches`` (an iterable), not counting the first ``warmup``."""
    crops, started = 0, None
    for k, batch in enumerate(batches):
        if k == warmup:
            _sync(step.device)
            started = time.perf_counter()
        step(batch)
        if k >= warmup:
            crops += len(batch["row"])
    _sync(step.device)
    elapsed = time.perf_counter() - started if started is not None else float("nan")
    return {"crops_per_s": crops / elapsed, "steps_per_s": crops / elapsed / step.config.batch_size}


# ---------------------------------------------------------------------------------------------
# Report


def describe_machine(device: torch.device) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu_model = names[0].strip() if names else cpu_model
    lines = [
        f"machine   {platform.node()} {cpu_model}, {cores} usable cores "
        f"({os.cpu_count()} logical), load average {os.getloadavg()[0]:.2f} "
        f"{os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}",
        f"software  Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads in training steps; loader workers use 1), "
        f"numpy {np.__version__}",
        f"device    {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Object store mode


class LoopbackS3:
    """moto's S3 server in its own process on a free 127.0.0.1 port, logging each request it
    answers; while entered, the environment points this process and the loader workers it
    forks at it (``AWS_ENDPOINT_URL``, dummy credentials), as it would for any S3 endpoint."""

    BUCKET = "loader-benchmark"

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="loader-s3-"))
        self.log = self.folder / "requests.log"

    def __enter__(self) -> LoopbackS3:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "benchmark",
            "AWS_SECRET_ACCESS_KEY": "benchmark",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text()[-2000:]
                    raise SystemExit(f"moto server did not start: {tail}") from None
                time.sleep(0.1)
        import fsspec

        self.fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
        self.fs.mkdir(self.BUCKET)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        with contextlib.suppress(OSError):
            self.log.unlink()
            self.folder.rmdir()

    def requests(self) -> int:
        """Requests answered so far (the server logs each one just after answering it)."""
        time.sleep(0.3)
        lines = self.log.read_text(errors="replace").splitlines()
        return sum("HTTP/1" in line for line in lines)

    def upload(self, local: str, name: str) -> str:
        """Copy what the loader reads of a local store (not ``_build/``) into the bucket."""
        url = f"s3://{self.BUCKET}/{name}"
        root = url.removeprefix("s3://")
        self.fs.put_file(f"{local}/zarr.json", f"{root}/zarr.json")
        for part in ("index", "shard_checksums", *SIGNALS):
            if Path(local, part).exists():
                self.fs.put(f"{local}/{part}/", f"{root}/{part}/", recursive=True)
        return url


@contextlib.contextmanager
def loader_before() -> Iterator[None]:
    """The loader as it was before ``ShardReader``: every read through zarr (the shard's index,
    then each chunk, one request each), and each loader worker reading the attributes and the
    whole index again when it opens the store. Loader workers fork from this process, so they
    run the same code."""
    shard_reader = dereverb_data.store_format.ShardReader
    reader, reopen = shard_reader.for_array, training.data.reopen_store
    shard_reader.for_array = staticmethod(lambda *args: None)  # type: ignore[method-assign]
    training.data.reopen_store = lambda url, options, *known: open_store(url, options)
    try:
        yield
    finally:
        shard_reader.for_array = reader  # type: ignore[method-assign]
        training.data.reopen_store = reopen


def object_store_mode(args: argparse.Namespace, workers: list[int]) -> int:
    """Crops/s from the local store and its S3 copy, each with the loader as it is and as it
    was before (:func:`loader_before`)."""
    if multiprocessing.get_start_method() != "fork":
        raise SystemExit("--object-store needs forked loader workers (Linux)")
    n_crops = args.batches * args.batch_size
    with LoopbackS3() as s3:
        t0 = time.perf_counter()
        remote = s3.upload(args.store, "store.zarr")
        print(
            f"s3        {remote} on moto {s3.endpoint} (its own process), uploaded in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        before = s3.requests()
        open_store(remote)
        print(f"          opening the store (attributes, index): {s3.requests() - before} requests")
        print(
            f"crops     {n_crops} ({args.batches} batches of {args.batch_size} x "
            f"{args.crop_frames} frames), seed {args.seed}; rates exclude the first batch; "
            "requests/crop include worker start-up\n"
        )
        results: dict[tuple[str, str, int], dict[str, Any]] = {}
        reference = None
        for reads in ("now", "before"):
            for n in workers:
                for where, url in (("local", args.store), ("s3", remote)):
                    with loader_before() if reads == "before" else contextlib.nullcontext():
                        dataset = CropDataset(url, args.split, args.crop_frames, args.seed)
                        loader = crop_loader(dataset, args.batch_size, 0, args.batches, n)
                        before = s3.requests()
                        result = time_loader(loader, keep=reference is None)
                        requests = s3.requests() - before
                    if reference is None:
                        reference = result["batches"][0]
                    first = next(iter(crop_loader(dataset, args.batch_size, 0, 1)))
                    if not all(torch.equal(first[k], reference[k]) for k in SIGNALS):
                        raise SystemExit(f"{where} {reads} crops differ: benchmark is broken")
                    result["requests_per_crop"] = requests / n_crops
                    results[(reads, where, n)] = result

    print(f"{'loader':<14} {'store':<6} {'workers':>7} {'crops/s':>9} {'start-up s':>11} "
          f"{'requests/crop':>14}")  # fmt: skip
    for (reads, where, n), result in results.items():
        per_crop = f"{result['requests_per_crop']:.2f}" if where == "s3" else "-"
        print(
            f"{reads:<14} {where:<6} {n:>7} {result['crops_per_s']:9.1f} "
            f"{result['startup_s']:11.2f} {per_crop:>14}"
        )
    print(f"\n{'ratio':<52} {'value':>7}")
    for reads in ("now", "before"):
        for n in workers:
            ratio = (
                results[(reads, "s3", n)]["crops_per_s"]
                / results[(reads, "local", n)]["crops_per_s"]
            )
            print(f"{f's3 / local ({reads}, {n} workers)':<52} {ratio:7.2f}")
    for where in ("local", "s3"):
        for n in workers:
            gain = (
                results[("now", where, n)]["crops_per_s"]
                / results[("before", where, n)]["crops_per_s"]
            )
            print(f"{f'now / before ({where}, {n} workers)':<52} {gain:7.2f}")
    return 0


def describe_store(url: str, split: str) -> str:
    store = open_store(url)
    array = store.arrays["reverberant"]
    rows = store.rows(split)
    frames = int(store.index["frame_count"][rows].sum())
    codecs = getattr(array, "compressors", None)
    return (
        f"store     {url}: {store.n_examples} examples, {array.shape[0]} frames x "
        f"{store.n_freq} bins, {array.dtype}; chunks {array.chunks}, "
        f"shards {getattr(array, 'shards', None)}, compressors {codecs}\n"
        f"          split {split!r}: {rows.size} examples, {frames} frames; "
        f"arrays {2 * array.nbytes / 2**20:.1f} MiB decoded"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--store", default=str(REPO / "stores" / "demo.zarr"), help="store URL")
    parser.add_argument("--split", default="train")
    parser.add_argument("--crop-frames", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=50, help="batches per loader timing")
    parser.add_argument("--workers", default="0,2", help="comma-separated loader worker counts")
    parser.add_argument("--model", default="bsrnn_lite")
    parser.add_argument("--model-kwargs", default="{}", help="JSON, e.g. '{\"hidden\": 96}'")
    parser.add_argument(
        "--train-steps", type=int, default=20, help="timed training steps (after warm-up)"
    )
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for training steps; 0: torch's default, as training/train.py",
    )
    parser.add_argument(
        "--resident-mb",
        type=float,
        default=2048,
        help="load the whole store into RAM if its arrays fit, else only the crops' frames",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 6 batches, 3 timed training steps"
    )
    parser.add_argument(
        "--object-store",
        action="store_true",
        help="compare the local store with a copy on a loopback S3 server (moto) instead",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.train_steps, args.warmup_steps = 6, 3, 1
    workers = [int(w) for w in args.workers.split(",")]

    print("$ " + shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    cpu = torch.device("cpu")
    print(describe_machine(cpu))
    print(describe_store(args.store, args.split))
    if args.object_store:
        return object_store_mode(args, workers)

    config = TrainConfig(
        model=args.model,
        model_kwargs=json.loads(args.model_kwargs),
        crop_frames=args.crop_frames,
        batch_size=args.batch_size,
        train_split=args.split,
        seed=args.seed,
    )
    n_samples = args.batches * args.batch_size
    dataset = CropDataset(args.store, args.split, args.crop_frames, args.seed)
    print(
        f"crops     {n_samples} ({args.batches} batches of {args.batch_size} x "
        f"{args.crop_frames} frames), seed {args.seed}; rates exclude the first batch"
    )

    # --- loaders --------------------------------------------------------------------------
    rows: list[tuple[str, float, str]] = []
    store_rates: dict[int, float] = {}
    for n in workers:
        loader = crop_loader(dataset, args.batch_size, 0, args.batches, num_workers=n)
        result = time_loader(loader)
        store_rates[n] = result["crops_per_s"]
        rows.append(
            (f"store, {n} workers", result["crops_per_s"], f"start-up {result['startup_s']:.2f} s")
        )

    t0 = time.perf_counter()
    resident = in_memory_dataset(dataset, args.resident_mb, n_samples)
    load_s = time.perf_counter() - t0
    frames = resident._lazy.store
    what = "whole store" if frames.whole else f"only the {n_samples} crops' frames"
    print(
        f"in-memory {what}: {frames.nbytes / 2**20:.1f} MiB of "
        f"{frames.store_nbytes / 2**20:.1f} MiB stored, loaded in {load_s:.1f} s (not timed)"
    )
    memory = time_loader(crop_loader(resident, args.batch_size, 0, args.batches), keep=True)
    rows.append(("in-memory (limit), 0 workers", memory["crops_per_s"], "numpy, same crops"))
    first_batch = next(iter(crop_loader(dataset, args.batch_size, 0, 1)))
    same = all(torch.equal(first_batch[k], memory["batches"][0][k]) for k in SIGNALS)
    if not same:
        raise SystemExit("in-memory crops differ from the store's: benchmark is broken")

    # --- training consumption ---------------------------------------------------------------
    steps = args.warmup_steps + args.train_steps
    batches = [memory["batches"][k % len(memory["batches"])] for k in range(steps)]
    store = open_store(args.store)
    step = TrainStep(config, store.n_freq, store.stft_config, cpu)
    consumption = time_training(step, batches, args.warmup_steps)
    rows.append(
        (
            f"training consumption ({args.model}, CPU)",
            consumption["crops_per_s"],
            f"{consumption['steps_per_s']:.2f} steps/s, {count_parameters(step.model)} params",
        )
    )
    n_fed = max(workers)
    fed_loader = crop_loader(dataset, args.batch_size, 0, steps, num_workers=n_fed)
    step = TrainStep(config, store.n_freq, store.stft_config, cpu)
    fed = time_training(step, fed_loader, args.warmup_steps)
    rows.append(
        (
            f"training fed by store, {n_fed} workers",
            fed["crops_per_s"],
            f"{fed['crops_per_s'] / consumption['crops_per_s']:.2f}x consumption",
        )
    )

    # --- table ----------------------------------------------------------------------------
    print(f"\n{'':<40} {'crops/s':>9}  notes")
    for name, rate, note in rows:
        print(f"{name:<40} {rate:9.1f}  {note}")
    print(f"\n{'ratio':<40} {'value':>9}  goal")
    for n, rate in store_rates.items():
        ratio = rate / memory["crops_per_s"]
        verdict = "ok" if ratio >= 0.8 else "MISSED"
        print(f"{f'store ({n} workers) / in-memory':<40} {ratio:9.2f}  >= 0.8  {verdict}")
    for n, rate in store_rates.items():
        ratio = rate / consumption["crops_per_s"]
        verdict = "ok" if ratio > 1 else "MISSED (loader is the bottleneck)"
        print(f"{f'store ({n} workers) / consumption':<40} {ratio:9.2f}  > 1     {verdict}")

    # --- GPU ------------------------------------------------------------------------------
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print("\n" + describe_machine(gpu))
        pinned = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        gpu_step = TrainStep(config, store.n_freq, store.stft_config, gpu)
        gpu_rate = time_training(gpu_step, pinned, max(args.warmup_steps, 3))
        print(
            f"GPU training: {gpu_rate['steps_per_s']:.2f} steps/s = "
            f"{gpu_rate['crops_per_s']:.1f} crops/s (autocast {gpu_step.amp_dtype}, "
            "batches already pinned in RAM)"
        )
        for n, rate in store_rates.items():
            ratio = rate / gpu_rate["crops_per_s"]
            keeps_up = "keeps up" if ratio > 1 else "does NOT keep up"
            print(f"store ({n} workers) / GPU consumption = {ratio:.2f}: loader {keeps_up}")
    else:
        print("\nCUDA not available: no GPU measurement")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
