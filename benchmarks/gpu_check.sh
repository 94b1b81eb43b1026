#!/usr/bin/env bash
# GPU path check (issue 13, item 7): train a few hundred steps on CUDA with mixed precision
# through the real training loop and print steps/s and seconds of audio trained per second.
#
#   bash benchmarks/gpu_check.sh [STEPS] [MODEL]      (defaults: 300 unet)
#
# Run it only on a machine with a CUDA GPU (the `device` tool's machine, when one is lent);
# it refuses to run on CPU. Needs the project installed (`make setup`, with a CUDA build of
# torch on that machine). It builds the tiny demo store (synthetic speech, no downloads) into a
# temporary folder and trains `MODEL` there with `device: cuda`, `amp: true` (bfloat16 autocast
# where the GPU supports it), batch 16 x 256 frames, no validation in the timed part.
set -euo pipefail
STEPS="${1:-300}"
MODEL="${2:-unet}"
PY="${PYTHON:-.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" - "$STEPS" "$MODEL" "$WORK" <<'PYTHON'
import sys, time
import torch
steps, model, work = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device here; run it on the GPU machine")
from flows.cli import main as dereverb
from training.config import TrainConfig
from training.train import train

assert dereverb(["build", "manifests/demo.yaml", "--store", f"{work}/demo.zarr"]) == 0
base = dict(model=model, device="cuda", amp=True, crop_frames=256, batch_size=16, num_workers=2,
            warmup_steps=10, eval_every=10**9, eval_examples=0, checkpoint_every=10**9,
            log_every=10**9, progress=False)
train(TrainConfig(**base, steps=20), f"{work}/demo.zarr", f"{work}/warm")  # CUDA start-up
torch.cuda.synchronize()
start = time.perf_counter()
train(TrainConfig(**base, steps=steps), f"{work}/demo.zarr", f"{work}/run")
torch.cuda.synchronize()
elapsed = time.perf_counter() - start
audio_s = steps * 16 * 256 * 128 / 16000
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, model {model}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
print(f"gpu_check: {steps} steps in {elapsed:.1f} s = {steps / elapsed:.2f} steps/s, "
      f"{audio_s / elapsed:.0f} s of audio per s (batch 16 x 2.05 s; includes the run's "
      "start-up and final checkpoint)")
PYTHON
