"""Dereverberate recordings of any length with bounded memory.

A file is read, resampled (soxr, streaming) and processed in blocks: each block is enhanced with
``context`` seconds of audio on both sides and only its centre is kept, so block edges never
reach the output and a one-hour file needs no more memory than one block. Blocks are 15 s: the
context costs 13 % more model time on long files (25 % with 8 s blocks), most utterances are
one block, and 30 s blocks measured no faster (benchmarks/inference_speed.py). Policy for
several channels: they are averaged to mono before enhancement (the models are single-channel),
and the output is mono at the input's sample rate.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from dereverb_data.stft import StftConfig, istft, stft

SpecFn = Callable[[np.ndarray], np.ndarray]  # complex (frames, freq) -> complex (frames, freq)


class EnhanceError(ValueError):
    """A file that cannot be enhanced; the message names it."""


def _same_file(a: Path, b: Path) -> bool:
    """Whether writing ``a`` would replace ``b``'s data: same resolved path, or same inode."""
    if a.resolve() == b.resolve():  # symlinks (of the files or of folders above them)
        return True
    try:
        return os.path.samefile(a, b)  # hard links: two names, one file
    except OSError:  # one of them does not exist yet
        return False


def plan_outputs(inputs: Sequence[str | Path], out_dir: str | Path) -> list[tuple[Path, Path]]:
    """Every ``(input, output)`` pair of an enhance run, decided before anything is written.

    Each input ``x`` goes to ``out_dir / x.name`` (``.wav``, ``.flac`` or ``.ogg``, the format
    following the suffix). Policy: the whole run is refused, with ``EnhanceError`` and before
    any file is written, when

    - an output would be the same file as any input (same resolved path, or the same existing
      file through a symlink or a hard link): inputs are never overwritten;
    - two inputs would get the same output name (``a/x.wav b/x.wav``, or one file given
      twice): the message names both inputs, and nothing is renamed behind the user's back;
    - an input's suffix is not an output format, ``out_dir`` is an existing file, or an output
      is an existing folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EnhanceError(f"{out_dir}: the output folder is an existing file")
    sources = [Path(source) for source in inputs]
    pairs: list[tuple[Path, Path]] = []
    claimed: dict[Path, Path] = {}  # resolved output -> the input that claimed it
    for source in sources:
        destination = out_dir / source.name
        _format(destination)
        if destination.is_dir():
            raise EnhanceError(f"{destination}: the output for {source} is an existing folder")
        key = destination.resolve()
        if key in claimed:
            raise EnhanceError(
                f"{claimed[key]} and {source} would both be written to {destination}; "
                "enhance them into different --out folders"
            )
        claimed[key] = source
        for other in sources:
            if _same_file(destination, other):
                raise EnhanceError(
                    f"{other}: the output {destination} would overwrite this input; "
                    "choose another --out folder"
                )
        pairs.append((source, destination))
    return pairs


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
    A block gets ``context`` samples of the signal on each side where the signal has them: none
    before the first block or after the last (there the model sees the signal's edge, as it does
    when the whole file is one block), so a file shorter than a block costs no extra model time.
    """
    hop = config.hop
    block_samples = max(hop, block_samples // hop * hop)
    context = context_samples // hop * hop
    buffer = np.zeros(0, np.float32)
    left = 0  # samples of left context at the start of ``buffer``
    done = False
    chunks = iter(blocks)
    while True:
        while not done and buffer.size < left + block_samples + context:
            chunk = next(chunks, None)
            if chunk is None:
                done = True
                break
            buffer = np.concatenate([buffer, chunk.astype(np.float32)])
        available = buffer.size - left
        if available <= 0:
            break
        take = min(block_samples, available)
        window = buffer[: left + take + min(context, available - take)]
        enhanced = istft(spec_fn(stft(window, config)), config, window.size)
        yield enhanced[left : left + take]
        keep = min(context, left + take)  # the next block's left context
        buffer = buffer[left + take - keep :]
        left = keep


def enhance_file(
    spec_fn: SpecFn,
    source: str | Path,
    destination: str | Path,
    sample_rate: int,
    config: StftConfig,
    block_s: float = 15.0,
    context_s: float = 1.0,
    progress: bool = False,
) -> Path:
    """Enhance ``source`` into ``destination`` (same sample rate as the input, mono).

    The audio is written to a temporary file next to ``destination`` and renamed over it only
    when complete: a failure part way (unreadable block, NaN samples, Ctrl-C) leaves neither a
    partial file nor a changed ``destination``. Use :func:`plan_outputs` first for several files.
    """
    source, destination = Path(source), Path(destination)
    if _same_file(destination, source):
        raise EnhanceError(f"{source}: the output would overwrite the input")
    out_format = _format(destination)
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
    destination.parent.mkdir(parents=True, exist_ok=True)
    # A random name per call, so the temporary file is never another file of the user's (nor
    # another run's); created by libsndfile with the usual permissions, unlike mkstemp's 0600.
    tmp = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.partial")
    try:
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=info.duration, unit="s", desc=source.name, leave=False)
        with sf.SoundFile(str(tmp), "w", out_rate, 1, format=out_format) as out:
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
                tail = back.resample_chunk(np.zeros(0, np.float32), last=True)
                tail = tail[: expected - written]
                out.write(np.clip(tail, -1.0, 1.0))
                written += tail.size
            if written < expected:  # resampler rounding: pad the last few samples
                out.write(np.zeros(expected - written))
        tmp.replace(destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return destination


def _format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    formats = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}
    if suffix not in formats:
        raise EnhanceError(f"{path}: output must be .wav, .flac or .ogg")
    return formats[suffix]
