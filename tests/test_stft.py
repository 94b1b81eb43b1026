"""Our STFT against independent references (torch.stft, scipy.signal.stft) and its inverse."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch

from dereverb_data.stft import StftConfig, analysis_window, istft, stft


@pytest.fixture
def signal() -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2 + 77) / 16000
    return (np.sin(2 * np.pi * 440 * t) + 0.3 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("n_fft,hop", [(512, 128), (256, 64), (1024, 256)])
def test_matches_torch_stft(signal: np.ndarray, n_fft: int, hop: int) -> None:
    ours = stft(signal, StftConfig(n_fft, hop))
    ref = (
        torch.stft(
            torch.from_numpy(signal).double(),
            n_fft,
            hop,
            window=torch.hann_window(n_fft, dtype=torch.float64),
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        .numpy()
        .T
    )
    assert ours.shape == ref.shape == (1 + signal.size // hop, n_fft // 2 + 1)
    assert np.max(np.abs(ours - ref)) < 1e-4 * np.max(np.abs(ref))


def test_matches_scipy_stft(signal: np.ndarray) -> None:
    config = StftConfig(512, 128)
    ours = stft(signal, config)
    # scipy scales by 1/sum(window) and pads to whole frames at the end.
    _, _, ref = scipy.signal.stft(
        signal.astype(np.float64),
        window=analysis_window(512),
        nperseg=512,
        noverlap=384,
        boundary="zeros",
        padded=True,
    )
    ref = ref.T * analysis_window(512).sum()
    n = ours.shape[0]
    assert ref.shape[0] >= n
    assert np.max(np.abs(ours - ref[:n])) < 1e-4 * np.max(np.abs(ref))


@pytest.mark.parametrize("window", ["hann", "sqrt-hann"])
def test_istft_inverts(signal: np.ndarray, window: str) -> None:
    config = StftConfig(512, 128, window)
    back = istft(stft(signal, config), config, signal.size)
    error = back - signal
    ser = 10 * np.log10(
        np.sum(signal.astype(np.float64) ** 2) / np.sum(error.astype(np.float64) ** 2)
    )
    assert back.shape == signal.shape
    assert ser > 100


def test_known_tone_lands_in_its_bin() -> None:
    config = StftConfig(512, 128)
    k = 32  # 1 kHz at 16 kHz: exactly bin 32
    x = np.cos(2 * np.pi * k / 512 * np.arange(8192))
    spec = stft(x, config)
    mid = spec[10:-10]
    assert np.all(np.argmax(np.abs(mid), axis=1) == k)
    # A periodic Hann sums to n_fft/2; a unit cosine puts half of that in its bin.
    np.testing.assert_allclose(np.abs(mid[:, k]), 512 / 4, rtol=1e-4)


def test_bad_shapes_are_refused() -> None:
    config = StftConfig(512, 128)
    with pytest.raises(ValueError, match="1-D"):
        stft(np.zeros((2, 100)), config)
    with pytest.raises(ValueError, match="257"):
        istft(np.zeros((10, 100), np.complex64), config, 1000)
    with pytest.raises(ValueError, match="window"):
        analysis_window(512, "kaiser")


@pytest.mark.parametrize(("n_fft", "hop"), [(512, 128), (256, 64), (400, 160), (512, 512)])
def test_overlap_add_is_bit_identical_to_np_add_at(n_fft: int, hop: int) -> None:
    # The reference: every frame scattered sample by sample with np.add.at, frames in order.
    from dereverb_data.stft import _overlap_add

    frames = np.random.default_rng(3).standard_normal((57, n_fft))
    total = n_fft + hop * (frames.shape[0] - 1)
    reference = np.zeros(total)
    index = (np.arange(frames.shape[0]) * hop)[:, None] + np.arange(n_fft)[None, :]
    np.add.at(reference, index, frames)
    np.testing.assert_array_equal(_overlap_add(frames, hop, total), reference)
