"""Block-wise enhancement of files: exactness of the blocking, rates, memory, bad files."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dereverb_data.demo_corpus import synthesize_utterance
from dereverb_data.stft import StftConfig
from training.enhance import EnhanceError, enhance_file, enhance_stream

CONFIG = StftConfig(512, 128)


def identity(spec: np.ndarray) -> np.ndarray:
    return spec


def speech(seconds: float, rate: int) -> np.ndarray:
    pieces = [synthesize_utterance("demo_f1", i, rate, 3.0) for i in range(int(seconds // 3) + 1)]
    return np.concatenate(pieces)[: int(seconds * rate)]


def ser_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    error = reference.astype(np.float64) - estimate.astype(np.float64)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum(error**2)))


def test_blocks_with_context_reproduce_whole_signal_processing() -> None:
    x = speech(10.0, 16000)
    chunks = (x[i : i + 3000] for i in range(0, x.size, 3000))  # chunks unaligned with blocks
    y = np.concatenate(list(enhance_stream(chunks, identity, CONFIG, 16000, 4000)))
    assert y.size == x.size
    assert ser_db(x, y) > 80

    def halve(spec: np.ndarray) -> np.ndarray:
        return 0.5 * spec

    chunks = (x[i : i + 5000] for i in range(0, x.size, 5000))
    half = np.concatenate(list(enhance_stream(chunks, halve, CONFIG, 8000, 2048)))
    np.testing.assert_allclose(half, 0.5 * x, atol=1e-5)


def smear(spec: np.ndarray) -> np.ndarray:
    """A model that looks 3 frames back and ahead (a moving average over 7 frames)."""
    padded = np.pad(spec, ((3, 3), (0, 0)))
    return sum(padded[k : k + spec.shape[0]] for k in range(7)) / 7


def test_context_makes_blocks_equal_to_the_whole_signal_for_a_model_with_memory() -> None:
    from dereverb_data.stft import istft, stft

    x = speech(10.0, 16000)
    whole = istft(smear(stft(x, CONFIG)), CONFIG, x.size)  # the file as one block
    chunks = (x[i : i + 3000] for i in range(0, x.size, 3000))
    blocks = np.concatenate(list(enhance_stream(chunks, smear, CONFIG, 16000, 2048)))
    # 16 frames of context cover the 3 the model looks at: the same samples, to float rounding.
    np.testing.assert_allclose(blocks, whole, atol=1e-6)
    chunks = (x[i : i + 3000] for i in range(0, x.size, 3000))
    blind = np.concatenate(list(enhance_stream(chunks, smear, CONFIG, 16000, 0)))
    assert ser_db(whole, blind) < 40  # without context the block edges show


def test_a_file_shorter_than_a_block_is_one_model_call_on_its_own_frames() -> None:
    x = speech(9.0, 16000)
    calls: list[int] = []

    def counting(spec: np.ndarray) -> np.ndarray:
        calls.append(spec.shape[0])
        return spec

    y = np.concatenate(list(enhance_stream(iter([x]), counting, CONFIG, 30 * 16000, 16000)))
    assert calls == [CONFIG.n_frames(x.size)] and y.size == x.size


def test_file_at_44k_stereo_comes_back_at_44k_mono(tmp_path: Path) -> None:
    x = speech(4.0, 44100)
    source = tmp_path / "in.flac"
    sf.write(source, np.stack([x, x], axis=1), 44100)
    out = enhance_file(identity, source, tmp_path / "out" / "in.wav", 16000, CONFIG)
    y, rate = sf.read(out)
    assert rate == 44100 and y.ndim == 1 and y.size == x.size
    # 44.1k -> 16k -> 44.1k keeps the speech band; compare after low-passing the reference.
    from scipy.signal import butter, sosfiltfilt

    lowpassed = sosfiltfilt(butter(10, 7000, fs=44100, output="sos"), x)
    assert ser_db(lowpassed[2000:-2000], y[2000:-2000]) > 25
    assert source.exists() and sf.info(source).channels == 2  # input untouched


def test_memory_does_not_grow_with_file_length(tmp_path: Path) -> None:
    peaks = []
    for seconds in (30, 120):
        source = tmp_path / f"long{seconds}.wav"
        sf.write(source, np.tile(speech(6.0, 16000), seconds // 6), 16000)
        tracemalloc.start()
        enhance_file(identity, source, tmp_path / f"out{seconds}.wav", 16000, CONFIG, block_s=4.0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert sf.info(tmp_path / f"out{seconds}.wav").frames == sf.info(source).frames
    # 4x the audio, about the same peak: nothing scales with the file's length.
    assert peaks[1] < 1.3 * peaks[0], peaks
    # A one-hour file would be 230 MB as float32; one block's working set is a small fraction.
    assert peaks[1] < 50e6


def test_bad_files_get_clear_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    with pytest.raises(EnhanceError, match=r"broken\.wav: unreadable"):
        enhance_file(identity, broken, tmp_path / "o.wav", 16000, CONFIG)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0), 16000)
    with pytest.raises(EnhanceError, match=r"empty\.wav: empty"):
        enhance_file(identity, empty, tmp_path / "o.wav", 16000, CONFIG)
    good = tmp_path / "good.wav"
    sf.write(good, speech(1.0, 16000), 16000)
    with pytest.raises(EnhanceError, match="overwrite"):
        enhance_file(identity, good, good, 16000, CONFIG)
    nan = tmp_path / "nan.wav"
    bad = speech(1.0, 16000)
    bad[10] = np.nan
    sf.write(nan, bad, 16000, subtype="FLOAT")
    with pytest.raises(EnhanceError, match="NaN"):
        enhance_file(identity, nan, tmp_path / "o2.wav", 16000, CONFIG)
    assert not (tmp_path / "o2.wav").exists()
