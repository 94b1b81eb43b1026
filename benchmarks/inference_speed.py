"""Inference speed: real-time factor of each model on one CPU thread.

Times ``model.enhance_spec`` on the STFT of 10 s of audio (the model alone) and the whole
``enhance_file`` path (read, resample, block-wise STFT/model/iSTFT, write) on a 60 s file, one
torch thread, against the audio's duration. Goal: the default model at least 50x real time.

    python benchmarks/inference_speed.py [--checkpoint runs/bsrnn/checkpoint.pt ...]
"""

from __future__ import annotations

import argparse
import platform
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
from training.models import DEFAULT_MODEL, MODELS, build_model, count_parameters  # noqa: E402


def best_of(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config, rate = StftConfig(512, 128), 16000
    audio = np.concatenate([synthesize_utterance("demo_m1", i, rate, 2.5) for i in range(4)])
    spec = stft(audio, config)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, 1 thread; 10 s of audio")
    print(
        f"{'model':<12} {'params':>9} {'model only':>12} {'RTF':>7} {'file path (60 s)':>17} "
        f"{'RTF':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.wav"
        sf.write(source, np.tile(audio, 6), rate)
        for name in args.models.split(","):
            model = build_model(name, config.n_freq).eval()
            seconds = best_of(lambda m=model: m.enhance_spec(torch.from_numpy(spec[None])))
            spec_fn = model_spec_fn(model, torch.device("cpu"))
            whole = best_of(
                lambda f=spec_fn: enhance_file(f, source, Path(tmp) / "out.wav", rate, config),
                repeats=2,
            )
            marker = " (default)" if name == DEFAULT_MODEL else ""
            print(
                f"{name + marker:<12} {count_parameters(model):>9} {seconds * 1000:>9.0f} ms "
                f"{10 / seconds:>6.0f}x {whole:>15.2f} s {60 / whole:>6.0f}x"
            )


if __name__ == "__main__":
    main()
