"""Training throughput: seconds of audio trained per second, per model, on the CPU.

One training step is what ``training/train.py`` does: model forward on a batch of reverberant
crops, ``training.losses.DereverbLoss`` (default weights: 0.7 compressed magnitude + 0.3
compressed complex) against the clean crops with the frame mask, backward, gradient clipping
(max norm 5) and an AdamW step. Each configuration gets one warm-up step (which includes
``torch.compile``'s compilation, reported separately) and ``--steps`` timed steps; the table
gives the median step. Throughput = batch x crop seconds / step time, in wall seconds and in
CPU seconds of this process (``time.process_time``), which a busy machine distorts less.

Variants tried for each model (where they apply):

- ``eager``: as ``train.py`` today (AdamW's default ``foreach`` implementation);
- ``fused``: ``AdamW(fused=True)``;
- ``channels_last``: convolution models with NHWC weights and activations;
- ``bf16``: ``torch.autocast("cpu", torch.bfloat16)`` around the model (the loss in float32,
  as ``train.py`` does on CUDA), where the CPU supports bfloat16;
- ``compile``: ``torch.compile`` of model + loss (``--compile``; off by default: minutes of
  compilation on 2 cores).

Then per model: parameters, MACs per second of audio (``training.models.count_macs``) and the
one-thread real-time factor of ``enhance_spec`` (``training.models.measure_speed``, best of 10
on 1 s of audio). Ratios are against ``bsrnn_lite`` (eager) at the same thread count in the
same run.

    python benchmarks/training_throughput.py [--batch 4] [--crop 256] [--threads 2,1]
        [--models bsrnn_lite,unet,gtcrn,gtcrn:rnn=gru] [--variants eager,bf16] [--omp-passive]

A model is a registry name, optionally with keyword arguments after a colon, ``;`` between
them: ``gtcrn:rnn=gru;frame_stride=1``. ``--omp-passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` before
torch starts: OpenMP threads then sleep instead of spinning while they wait, which matters
when other processes share the cores (see benchmarks/RESULTS.md, "Training throughput").
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if "--omp-passive" in sys.argv:  # read by OpenMP when torch loads: before the import
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.losses import DereverbLoss  # noqa: E402
from training.models import (  # noqa: E402
    MODELS,
    build_model,
    count_macs,
    count_parameters,
    measure_speed,
)

SAMPLE_RATE, HOP, N_FREQ = 16000, 128, 257
BASELINE = "bsrnn_lite"
CONV_MODELS = {"unet", "gtcrn"}  # where channels-last can matter


def bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def make_batch(batch: int, crop: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed synthetic batch: speed does not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, crop, N_FREQ)
    reverberant = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    clean = 0.5 * reverberant + 0.1 * torch.randn(shape, generator=g, dtype=torch.complex64)
    return {"reverberant": reverberant, "clean": clean, "mask": torch.ones(batch, crop)}


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"gtcrn:rnn=gru;frame_stride=1"`` -> ``("gtcrn", {"rnn": "gru", "frame_stride": 1})``."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, kwargs


def time_training(
    spec: str, variant: str, batch: dict[str, torch.Tensor], steps: int
) -> dict[str, float]:
    """Median wall and CPU seconds of one training step of model ``spec`` in ``variant``."""
    torch.manual_seed(0)
    name, kwargs = parse_spec(spec)
    if variant == "channels_last" and name == "gtcrn":
        kwargs["channels_last"] = True
    model = build_model(name, N_FREQ, **kwargs)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=variant == "fused" or None)
    criterion = DereverbLoss()

    def forward_loss(reverberant: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
            estimate = model(reverberant)
        return criterion(estimate, clean, mask)[0]

    step_loss = torch.compile(forward_loss) if variant == "compile" else forward_loss

    def step() -> None:
        loss = step_loss(batch["reverberant"], batch["clean"], batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    start = time.perf_counter()
    step()  # warm-up (and compilation)
    warmup = time.perf_counter() - start
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "warmup": warmup}


def variants_for(spec: str, compile_too: bool) -> list[str]:
    names = ["eager", "fused"]
    if parse_spec(spec)[0] in CONV_MODELS:
        names.append("channels_last")
    if bf16_supported():
        names.append("bf16")
    if compile_too:
        names.append("compile")
    return names


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"bf16 {'yes' if bf16_supported() else 'no'}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}; "
        f"load average at start: {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join([*MODELS, "gtcrn:rnn=gru", "gtcrn:frame_stride=1"])
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=256, help="frames (hop 128 at 16 kHz)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--variants", default=None, help="comma list; default: all that apply")
    parser.add_argument("--compile", action="store_true", help="also try torch.compile")
    parser.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE")
    args = parser.parse_args()
    names = args.models.split(",")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    audio_s = args.batch * args.crop * HOP / SAMPLE_RATE
    batch = make_batch(args.batch, args.crop)
    print(f"machine: {machine_line()}")
    print(
        f"batch {args.batch} x crop {args.crop} frames ({args.crop * HOP / SAMPLE_RATE:.2f} s) "
        f"= {audio_s:.1f} s of audio per step; median of {args.steps} steps after 1 warm-up\n"
    )
    print(
        "| model | threads | variant | step (wall ms) | step (CPU ms) | audio s / wall s "
        "| audio s / CPU s | x bsrnn_lite (wall) | x bsrnn_lite (CPU) | warm-up s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    previous_threads = torch.get_num_threads()
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        baseline: dict[str, float] | None = None
        for name in names:
            variants = variants_for(name, args.compile)
            if args.variants:
                wanted = args.variants.split(",")
                variants = [v for v in variants if v in wanted or v == "eager"]
            for variant in variants:
                try:
                    result = time_training(name, variant, batch, args.steps)
                except Exception as exc:  # a variant this model or CPU cannot do: say so
                    print(f"| {name} | {threads} | {variant} | failed: {exc!s:.80} |||||||")
                    continue
                if name == BASELINE and variant == "eager":
                    baseline = result
                assert baseline is not None
                print(
                    f"| {name} | {threads} | {variant} | {result['wall'] * 1e3:.0f} "
                    f"| {result['cpu'] * 1e3:.0f} | {audio_s / result['wall']:.1f} "
                    f"| {audio_s / result['cpu']:.1f} "
                    f"| {baseline['wall'] / result['wall']:.2f} "
                    f"| {baseline['cpu'] / result['cpu']:.2f} | {result['warmup']:.1f} |",
                    flush=True,
                )
    torch.set_num_threads(previous_threads)
    print(
        "\n(CPU s: this process's CPU time, all its threads; on a machine shared with other "
        "work the wall-clock numbers are depressed, the CPU numbers much less)\n"
    )
    print(
        "| model | parameters | M MACs per s of audio | 1-thread inference, ms per s "
        "| x real time |"
    )
    print("|---|---|---|---|---|")
    for name in names:
        torch.manual_seed(0)
        model = build_model(parse_spec(name)[0], N_FREQ, **parse_spec(name)[1])
        seconds = measure_speed(model, n_frames=1 + SAMPLE_RATE // HOP, repeats=10, threads=1)
        print(
            f"| {name} | {count_parameters(model):,} | {count_macs(model) / 1e6:.1f} "
            f"| {seconds * 1e3:.1f} | {1 / seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
