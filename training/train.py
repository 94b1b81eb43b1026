"""Train a dereverberation model on a store: one config object, one readable loop.

    from training.train import TrainConfig, train
    metrics = train(TrainConfig(steps=2000), "stores/tiny.zarr", "runs/tiny")

What happens, in order (read :func:`train` top to bottom):

1. Build the model (``TrainConfig.model``, see ``training.models.MODELS``), AdamW, a linear
   warmup + cosine learning-rate schedule and the loss (``training.losses.DereverbLoss``).
2. If ``out_dir/checkpoint.pt`` exists, resume from it: weights, optimizer, scheduler, AMP
   scaler, step and RNG states. The data needs no state: the batch of step ``s`` is a pure
   function of ``(seed, s)`` (``training.data.sample_crop``), so a killed run restarted from its
   last checkpoint ends with the same weights as a run that was never interrupted.
3. Loop over steps: crops -> model -> loss -> backward -> clip -> step; log to TensorBoard
   (``out_dir/tensorboard``) and a tqdm bar; every ``eval_every`` steps, SI-SDR of a few whole
   validation examples; every ``checkpoint_every`` steps (and at the end) an atomic checkpoint.
4. Return the final metrics (also written to ``out_dir/metrics.json``).

Checkpoints hold only tensors and plain Python types (the config as a dict), so
``torch.load(path, weights_only=True)`` reads them (``training.checkpoint.read_checkpoint``,
which raises ``CheckpointError`` for anything that is not one); :func:`load_model` rebuilds the
model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from dereverb_data.stft import StftConfig
from dereverb_data.store_format import open_store
from training.checkpoint import model_from_checkpoint, not_a_checkpoint, one_line, read_checkpoint
from training.config import TrainConfig, resolve_device
from training.data import (
    CropDataset,
    ValidationDataset,
    crop_loader,
    torch_istft,
)
from training.losses import DereverbLoss, si_sdr
from training.models import SpectralModel, build_model, count_parameters

CHECKPOINT_NAME = "checkpoint.pt"
# What a checkpoint holds beyond the model, to resume a run from it.
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "step", "metrics")
# Fields that may differ between a checkpoint and the run resuming it: they do not change the
# weights the run ends with.
RESUMABLE_CHANGES = frozenset(
    {"num_workers", "device", "log_every", "eval_every", "eval_examples", "progress"}
)


class RunFolderError(ValueError):
    """A run folder that this run cannot use (a file, or another run's); the message names it."""


def model_arguments(config: TrainConfig) -> dict[str, Any]:
    """Keyword arguments for ``build_model`` from a config."""
    kwargs = {"exponent": config.compress_exponent, **config.model_kwargs}
    if config.features is not None:
        kwargs["features"] = config.features
    return kwargs


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier for (0-based) ``step``: linear warmup, then cosine to min_lr."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    min_factor = config.min_lr / config.lr
    return min_factor + (1 - min_factor) * cosine


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write to a temporary file, then rename: a kill never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: no half-written file left next to the run
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, values: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_resumable(saved: dict[str, Any], config: TrainConfig, checkpoint_path: Path) -> None:
    current = config.to_dict()
    changed = sorted(
        key
        for key in set(saved) | set(current)
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise RunFolderError(
            f"{checkpoint_path}: made with a different config ({details}); "
            "use a new out_dir or the same config"
        )


@torch.no_grad()
def evaluate(
    model: SpectralModel,
    examples: list[dict[str, Any]],
    criterion: DereverbLoss,
    stft: StftConfig,
    device: torch.device,
) -> dict[str, float]:
    """Loss and SI-SDR (dB, of the waveforms) of whole examples, and SI-SDR of the input."""
    losses, scores, unprocessed = [], [], []
    for example in examples:
        reverberant = example["reverberant"].to(device).unsqueeze(0)
        clean = example["clean"].to(device).unsqueeze(0)
        estimate = model.enhance_spec(reverberant)
        losses.append(criterion(estimate, clean)[0].item())
        length = example["num_samples"]
        clean_wave = torch_istft(clean, stft, length)
        scores.append(si_sdr(torch_istft(estimate, stft, length), clean_wave).item())
        unprocessed.append(si_sdr(torch_istft(reverberant, stft, length), clean_wave).item())
    return {
        "valid_loss": float(np.mean(losses)),
        "valid_si_sdr": float(np.mean(scores)),
        "valid_si_sdr_unprocessed": float(np.mean(unprocessed)),
        "valid_si_sdr_improvement": float(np.mean(scores) - np.mean(unprocessed)),
    }


def train(
    config: TrainConfig,
    data_url: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    stop_at_step: int | None = None,
) -> dict[str, float]:
    """Train (or resume training) on the store at ``data_url``; write everything to ``out_dir``.

    Resumes from ``out_dir/checkpoint.pt`` when it exists (the config must match, apart from
    ``RESUMABLE_CHANGES``). ``stop_at_step`` returns after that step without a final checkpoint,
    as if the process had been killed there (tests, time-sliced jobs); calling ``train`` again
    continues from the last periodic checkpoint. Returns the latest metrics: ``step``,
    ``train_loss``, ``lr``, ``valid_loss``, ``valid_si_sdr``, ``valid_si_sdr_unprocessed``,
    ``valid_si_sdr_improvement`` (dB) and ``parameters``.

    A store that cannot be trained on (missing, not a store, unfinished) raises ``StoreError``
    (``dereverb_data.store_format.StoreReadError``) before anything is written; an ``out_dir``
    that is a file, or holds the checkpoint of a different config, raises ``RunFolderError``; a
    damaged checkpoint there raises ``CheckpointError`` (and is kept). A run that fails before
    ``out_dir`` holds a checkpoint leaves nothing behind: the folders this call created are
    removed, and in a folder that existed only the entries this call added; files that were
    there before are never touched. Once a checkpoint exists the folder is kept (resumable).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"{out_dir}: the run folder is an existing file")
    store = open_store(data_url)  # before anything is written: a bad store leaves no folder
    created = _first_missing_ancestor(out_dir)
    before = set() if created is not None or not out_dir.is_dir() else set(os.listdir(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(config, store, data_url, out_dir, stop_at_step)
    except BaseException:  # Ctrl-C too: with no checkpoint there is nothing to resume
        if not (out_dir / CHECKPOINT_NAME).exists():
            _remove_failed_run(out_dir, created, before)
        raise


def _first_missing_ancestor(path: Path) -> Path | None:
    """The top-most folder of ``path`` that does not exist yet (``path`` itself or a parent)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing = folder
    return missing


def _remove_failed_run(out_dir: Path, created: Path | None, before: set[str]) -> None:
    """Undo what a failed call wrote: only paths that did not exist when it started."""
    if created is None:
        for name in set(os.listdir(out_dir)) - before:
            entry = out_dir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    # Parents this call created were empty when it started; rmdir refuses any that is not now.
    for folder in out_dir.parents:
        if not folder.is_relative_to(created):
            break
        try:
            folder.rmdir()
        except OSError:
            break


def _run(
    config: TrainConfig,
    store: Any,
    data_url: str | os.PathLike,
    out_dir: Path,
    stop_at_step: int | None,
) -> dict[str, float]:
    """The body of :func:`train`, in a folder that exists, on a store that is open."""
    device = resolve_device(config.device)
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16
    if use_amp and not torch.cuda.is_bf16_supported():
        amp_dtype = torch.float16

    # --- model, optimizer, schedule, loss -----------------------------------------------------
    stft = store.stft_config
    torch.manual_seed(config.seed)
    model = build_model(config.model, store.n_freq, **model_arguments(config)).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, config))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    criterion = DereverbLoss(
        config.magnitude_weight,
        config.complex_weight,
        config.mrstft_weight,
        exponent=config.compress_exponent,
        stft=stft,
    )

    # --- resume -------------------------------------------------------------------------------
    step = 0
    metrics: dict[str, float] = {"parameters": count_parameters(model)}
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if checkpoint_path.exists():
        checkpoint = read_checkpoint(checkpoint_path)
        missing = [k for k in TRAINING_STATE if k not in checkpoint]
        if missing:
            raise not_a_checkpoint(checkpoint_path, f"cannot resume: missing {', '.join(missing)}")
        _check_resumable(checkpoint["config"], config, checkpoint_path)
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
            _set_rng_state(checkpoint["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise not_a_checkpoint(checkpoint_path, f"cannot resume: {one_line(exc)}") from None
        step = checkpoint["step"]
        metrics.update(checkpoint["metrics"])
        del checkpoint
    _write_json(out_dir / "config.json", config.to_dict())

    # --- data ---------------------------------------------------------------------------------
    stop = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
    dataset = CropDataset(data_url, config.train_split, config.crop_frames, config.seed)
    loader = crop_loader(
        dataset,
        config.batch_size,
        start_step=step,
        stop_step=stop,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    valid_examples = []
    if config.eval_examples > 0:
        valid = ValidationDataset(data_url, config.valid_split, config.eval_examples)
        valid_examples = list(valid)  # a few whole examples, kept in memory

    def make_checkpoint() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "rng": _rng_state(),
            "config": config.to_dict(),
            "model_name": config.model,
            "model_kwargs": json.loads(json.dumps(model_arguments(config))),
            "n_freq": store.n_freq,
            "stft": {"n_fft": stft.n_fft, "hop": stft.hop, "window": stft.window},
            "sample_rate": store.sample_rate,
            "metrics": dict(metrics),
        }

    # --- the loop -----------------------------------------------------------------------------
    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step or None)
    progress = tqdm(total=config.steps, initial=step, disable=not config.progress, desc="train")
    running_loss: list[torch.Tensor] = []
    first_step, started = step, time.perf_counter()
    model.train()
    # Closed on failure too, so a failed run's event file is complete before any cleanup.
    try:
        for batch in loader:
            reverberant = batch["reverberant"].to(device, non_blocking=True)
            clean = batch["clean"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)

            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                estimate = model(reverberant)
            loss, parts = criterion(estimate, clean, mask)  # float32, outside autocast

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if config.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            else:
                grad_norm = torch.zeros(())
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            running_loss.append(loss.detach())
            progress.update()

            if step % config.log_every == 0 or step == stop:
                metrics["train_loss"] = torch.stack(running_loss).mean().item()
                metrics["lr"] = scheduler.get_last_lr()[0]
                running_loss.clear()
                writer.add_scalar("train/loss", metrics["train_loss"], step)
                for name, value in parts.items():
                    writer.add_scalar(f"train/{name}", value.item(), step)
                writer.add_scalar("train/grad_norm", grad_norm.item(), step)
                writer.add_scalar("train/lr", metrics["lr"], step)
                speed = (step - first_step) / (time.perf_counter() - started)
                writer.add_scalar("train/steps_per_s", speed, step)
                progress.set_postfix(loss=f"{metrics['train_loss']:.4f}")

            if valid_examples and (step % config.eval_every == 0 or step == config.steps):
                metrics.update(evaluate(model, valid_examples, criterion, stft, device))
                for name in ("valid_loss", "valid_si_sdr", "valid_si_sdr_improvement"):
                    writer.add_scalar(f"valid/{name.removeprefix('valid_')}", metrics[name], step)

            if step % config.checkpoint_every == 0 or step == config.steps:
                metrics["step"] = step
                save_checkpoint(checkpoint_path, make_checkpoint())
    finally:
        progress.close()
        writer.close()
    metrics["step"] = step
    if step == config.steps:
        _write_json(out_dir / "metrics.json", metrics)
    return metrics


def load_model(
    checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[SpectralModel, TrainConfig]:
    """Rebuild the model of a checkpoint in eval mode on ``device``, with its training config.

    ``model.enhance_spec(reverberant)`` then dereverberates complex ``(B, T, F)`` STFTs made with
    ``checkpoint["stft"]`` (the training store's STFT settings).
    """
    return model_from_checkpoint(read_checkpoint(checkpoint_path), checkpoint_path, device)
