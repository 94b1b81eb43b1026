"""Inference speed: real-time factor of each model and of the whole ``enhance`` path, one thread.

Three measurements, each against a baseline in the same run (one torch thread throughout):

1. the model alone on the STFT of 10 s of audio, as training builds it, with batch norm folded
   into the convolutions (``training.inference.for_inference``), and with denormals flushed to
   zero as well (both: what ``training.inference.load_checkpoint`` gives ``enhance``);
2. the whole ``enhance_file`` path (read, resample, blocks, STFT/model/iSTFT, write) on one 60 s
   file at 44.1 kHz (so both resampling steps run): before (8 s blocks, model as trained) and now
   (15 s blocks, the model as ``enhance`` loads it);
3. ``dereverb enhance`` on 70 files of 9 s in one command, start-up (imports, model load)
   included, by wall clock.

Models: the packaged default (``training/default_model``) and untrained copies of the others.

    python benchmarks/inference_speed.py [--models default,unet,bsrnn_lite,gtcrn] [--files 70]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dereverb_data.demo_corpus import synthesize_utterance  # noqa: E402
from dereverb_data.stft import StftConfig, stft  # noqa: E402
from training.enhance import enhance_file, model_spec_fn  # noqa: E402
from training.inference import for_inference  # noqa: E402
from training.models import build_model, count_parameters  # noqa: E402

CPU = torch.device("cpu")


def best_of(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def as_trained(name: str) -> torch.nn.Module:
    """The model as training builds it (not folded): the packaged weights for ``default``."""
    if name == "default":
        from training.packaged import DEFAULT_MODEL_FILE, read_exported
        from training.train import model_from_checkpoint

        return model_from_checkpoint(read_exported(DEFAULT_MODEL_FILE), DEFAULT_MODEL_FILE)[0]
    return build_model(name, 257).eval()


def cli_batch(files: int, seconds: float, tmp: Path) -> tuple[float, float]:
    """Wall seconds of one ``dereverb enhance`` over ``files`` files, and their audio seconds."""
    folder = tmp / "batch"
    folder.mkdir()
    paths = []
    for i in range(files):
        audio = synthesize_utterance(f"demo_f{i % 3 + 1}", i, 16000, seconds)
        paths.append(folder / f"f{i:03d}.wav")
        sf.write(paths[-1], audio, 16000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "flows.cli", "enhance", *map(str, paths), "--out"]
    start = time.perf_counter()
    subprocess.run([*command, str(tmp / "out")], cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start, files * seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,unet,bsrnn_lite,gtcrn")
    parser.add_argument("--files", type=int, default=70, help="files in the CLI batch (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config, rate = StftConfig(512, 128), 16000
    audio = np.concatenate([synthesize_utterance("demo_m1", i, rate, 2.5) for i in range(4)])
    spec = torch.from_numpy(stft(audio, config)[None])
    load = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, 1 thread; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        "| model | params | model 10 s: as trained | folded | folded + no denormals | x "
        "| file 60 s: before (8 s blocks, as trained) | now (15 s blocks, as loaded) | x |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "in.wav"
        long = np.tile(audio, 6)
        import soxr

        sf.write(source, soxr.resample(long, rate, 44100), 44100)  # both resampling steps run
        out = tmp / "out.wav"
        for name in args.models.split(","):
            model = as_trained(name)
            folded = for_inference(copy.deepcopy(model))
            before_fn, now_fn = model_spec_fn(model, CPU), model_spec_fn(folded, CPU)
            torch.set_flush_denormal(False)
            with torch.inference_mode():
                plain_s = best_of(lambda m=model: m.enhance_spec(spec))
                folded_s = best_of(lambda m=folded: m.enhance_spec(spec))
            before = best_of(
                lambda f=before_fn: enhance_file(f, source, out, rate, config, block_s=8.0),
                repeats=2,
            )
            torch.set_flush_denormal(True)  # what training.inference.load_checkpoint sets
            with torch.inference_mode():
                fast_s = best_of(lambda m=folded: m.enhance_spec(spec))
            now = best_of(lambda f=now_fn: enhance_file(f, source, out, rate, config), repeats=2)
            torch.set_flush_denormal(False)
            print(
                f"| {name} | {count_parameters(model):,} | {10 / plain_s:.0f}x | "
                f"{10 / folded_s:.0f}x | {10 / fast_s:.0f}x | {plain_s / fast_s:.2f} | "
                f"{60 / before:.0f}x | {60 / now:.0f}x | {before / now:.2f} |"
            )
        if args.files:
            wall, seconds = cli_batch(args.files, 9.0, tmp)
            print(
                f"\n`dereverb enhance` of {args.files} files x 9 s (default model, one thread, "
                f"start-up included): {wall:.1f} s wall for {seconds:.0f} s of audio = "
                f"{seconds / wall:.0f}x real time"
            )


if __name__ == "__main__":
    main()
