"""Dereverberate recordings of any length with bounded memory.

A file is read, resampled (soxr, streaming) and processed in blocks: each block is enhanced with
``context`` seconds of audio on both sides and only its centre is kept, so block edges never
reach the output and a one-hour file needs no more memory than one block. Policy for several
channels: they are averaged to mono before enhancement (the models are single-channel), and the
output is mono at the input's sample rate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from dereverb_data.stft import StftConfig, istft, stft

SpecFn = Callable[[np.ndarray], np.ndarray]  # complex (frames, freq) -> complex (frames, freq)


class EnhanceError(ValueError):
    """A file that cannot be enhanced; the message names it."""


def model_spec_fn(model: torch.nn.Module, device: torch.device) -> SpecFn:
    """Wrap a model's ``enhance_spec`` for one (frames, freq) complex64 array."""

    def run(spec: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(spec[None].astype(np.complex64)).to(device)
            return model.enhance_spec(x)[0].cpu().numpy()

    return run


def reconstruct_fn(spec_fn: SpecFn, phase: str, config: StftConfig, n_iter: int = 32) -> SpecFn:
    """Turn a model's estimate into the spectrogram whose inverse is written out.

    ``reverberant`` and ``model`` keep the model's output as is (its own phase for complex
    models, the reverberant phase for magnitude models); ``fgla`` and ``gd`` keep only its
    magnitude and reconstruct the phase, starting from the reverberant phase.
    """
    if phase in ("reverberant", "model"):
        return spec_fn
    from .phase import reconstruct

    def run(reverberant: np.ndarray) -> np.ndarray:
        estimate = spec_fn(reverberant)
        length = (reverberant.shape[0] - 1) * config.hop
        signal = reconstruct(
            np.abs(estimate), reverberant, config, method=phase, length=length, n_iter=n_iter
        )
        return stft(signal, config)[: reverberant.shape[0]]

    return run


def _stream_mono(path: Path, rate: int, block: int) -> Iterator[np.ndarray]:
    """Mono float32 blocks at ``rate``, resampled on the fly (never the whole file)."""
    with sf.SoundFile(str(path)) as handle:
        resampler = None
        if handle.samplerate != rate:
            resampler = soxr.ResampleStream(handle.samplerate, rate, 1, dtype="float32")
        for raw in handle.blocks(blocksize=block, dtype="float32", always_2d=True):
            mono = raw.mean(axis=1).astype(np.float32)
            if not np.all(np.isfinite(mono)):
                raise EnhanceError(f"{path}: contains NaN or infinite samples")
            yield resampler.resample_chunk(mono) if resampler else mono
        if resampler:
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def enhance_stream(
    blocks: Iterator[np.ndarray],
    spec_fn: SpecFn,
    config: StftConfig,
    block_samples: int,
    context_samples: int,
) -> Iterator[np.ndarray]:
    """Enhanced audio for a stream of input chunks, block by block with context.

    The output has exactly as many samples as the input. Block length and context are whole
    multiples of the hop so every block's frames line up with the frames of the whole signal.
    """
    hop = config.hop
    block_samples = max(hop, block_samples // hop * hop)
    context = context_samples // hop * hop
    buffer = np.zeros(context, np.float32)  # left context of the first block is silence
    done = False
    chunks = iter(blocks)
    while True:
        while not done and buffer.size < context + block_samples + context:
            chunk = next(chunks, None)
            if chunk is None:
                done = True
                break
            buffer = np.concatenate([buffer, chunk.astype(np.float32)])
        available = buffer.size - context
        if available <= 0:
            break
        take = min(block_samples, available)
        window = buffer[: context + take + context]
        padded = np.pad(window, (0, context + take + context - window.size))
        spec = stft(padded, config)
        enhanced = istft(spec_fn(spec), config, padded.size)
        yield enhanced[context : context + take]
        buffer = buffer[take:]


def enhance_file(
    spec_fn: SpecFn,
    source: str | Path,
    destination: str | Path,
    sample_rate: int,
    config: StftConfig,
    block_s: float = 8.0,
    context_s: float = 1.0,
    progress: bool = False,
) -> Path:
    """Enhance ``source`` into ``destination`` (same sample rate as the input, mono)."""
    source, destination = Path(source), Path(destination)
    if destination.resolve() == source.resolve():
        raise EnhanceError(f"{source}: the output would overwrite the input")
    try:
        info = sf.info(str(source))
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise EnhanceError(f"{source}: unreadable audio ({exc})") from None
    if info.frames == 0:
        raise EnhanceError(f"{source}: empty (no samples)")
    block = int(block_s * sample_rate)
    chunks = _stream_mono(source, sample_rate, block)
    out_rate = info.samplerate
    back = None
    if out_rate != sample_rate:
        back = soxr.ResampleStream(sample_rate, out_rate, 1, dtype="float32")
    expected = info.frames
    written = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=info.duration, unit="s", desc=source.name, leave=False)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.partial")
    with sf.SoundFile(str(tmp), "w", out_rate, 1, format=_format(destination)) as out:
        pieces = enhance_stream(chunks, spec_fn, config, block, int(context_s * sample_rate))
        for piece in pieces:
            if back is not None:
                piece = back.resample_chunk(piece.astype(np.float32))
            piece = piece[: expected - written]
            out.write(np.clip(piece, -1.0, 1.0))
            written += piece.size
            if bar is not None:
                bar.update(piece.size / out_rate)
        if back is not None:
            tail = back.resample_chunk(np.zeros(0, np.float32), last=True)[: expected - written]
            out.write(np.clip(tail, -1.0, 1.0))
            written += tail.size
        if written < expected:  # resampler rounding: pad the last few samples
            out.write(np.zeros(expected - written))
    if bar is not None:
        bar.close()
    tmp.replace(destination)
    return destination


def _format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    formats = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}
    if suffix not in formats:
        raise EnhanceError(f"{path}: output must be .wav, .flac or .ogg")
    return formats[suffix]
