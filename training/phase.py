"""Phase reconstruction for magnitude-domain dereverberation.

Why this module exists: a magnitude-only model that reuses the reverberant phase is capped at
about PESQ-WB 2.85 even with a perfect magnitude, while fast Griffin-Lim started from the
reverberant phase lifts the same oracle magnitude to about 4.56 (``DESIGN.md``). Starting from
the reverberant phase matters: Griffin-Lim from a random start wrecks SI-SDR (-18 to -23 dB)
even when PESQ rises, because it converges to a time-shifted/sign-flipped consistent signal.
Never report SI-SDR of random-start Griffin-Lim output without saying so.

All transforms follow the project STFT convention (``dereverb_data.stft``): periodic Hann
(or sqrt-Hann) window, ``center=True`` with zero padding, no normalisation, time-major
``(frames, freq)`` arrays. Internally the iterations run on ``torch.stft``/``torch.istft`` in
float64, which implement exactly that convention (checked in ``tests/test_phase.py``) and are
differentiable for the gradient-descent refinements.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from dereverb_data.stft import StftConfig, analysis_window, stft

_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# torch STFT helpers with the project convention


def _window(config: StftConfig) -> torch.Tensor:
    return torch.from_numpy(analysis_window(config.n_fft, config.window)).to(torch.float64)


def _stft_t(x: torch.Tensor, config: StftConfig, window: torch.Tensor) -> torch.Tensor:
    """Complex STFT, (frames, freq); identical to ``dereverb_data.stft.stft`` but in torch."""
    spec = torch.stft(
        x,
        config.n_fft,
        config.hop,
        window=window,
        center=True,
        pad_mode="constant",
        return_complex=True,
    )
    return spec.transpose(-1, -2)


def _istft_t(
    spec: torch.Tensor, config: StftConfig, window: torch.Tensor, length: int
) -> torch.Tensor:
    """Least-squares inverse (weighted overlap-add), identical to ``dereverb_data.stft.istft``."""
    return torch.istft(
        spec.transpose(-1, -2),
        config.n_fft,
        config.hop,
        window=window,
        center=True,
        length=length,
    )


def _default_length(n_frames: int, config: StftConfig) -> int:
    # n_frames = 1 + n // hop, so (n_frames - 1) * hop is the shortest consistent length.
    return (n_frames - 1) * config.hop


def _check_magnitude(magnitude: np.ndarray, config: StftConfig) -> np.ndarray:
    mag = np.asarray(magnitude)
    if np.iscomplexobj(mag):
        raise ValueError("expected a real magnitude spectrogram, got complex values")
    # A model may emit small negative values; a magnitude below zero means "nothing here".
    mag = np.maximum(mag.astype(np.float64), 0.0)
    if mag.ndim != 2 or mag.shape[1] != config.n_freq:
        raise ValueError(f"magnitude must be (frames, {config.n_freq}), got {mag.shape}")
    return mag


def spectral_convergence(magnitude: np.ndarray, signal: np.ndarray, config: StftConfig) -> float:
    """``|| |S| - |STFT(x)| ||_F / || S ||_F``: how far ``signal`` is from having the target
    magnitude. 0 means ``magnitude`` is exactly the STFT magnitude of ``signal``."""
    mag = _check_magnitude(magnitude, config)
    rebuilt = np.abs(stft(np.asarray(signal, dtype=np.float64), config)).astype(np.float64)
    if rebuilt.shape != mag.shape:
        raise ValueError(
            f"signal gives {rebuilt.shape[0]} frames, magnitude has {mag.shape[0]}; "
            "pass the matching signal length"
        )
    return float(np.linalg.norm(mag - rebuilt) / max(np.linalg.norm(mag), _EPS))


# ---------------------------------------------------------------------------------------------
# Griffin-Lim and gradient refinement


def griffin_lim(
    magnitude: np.ndarray,
    config: StftConfig,
    n_iter: int = 100,
    init_phase: np.ndarray | Literal["zero", "random"] | None = None,
    momentum: float = 0.99,
    length: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, list[float]]:
    """Fast Griffin-Lim (Perraudin, Balazs & Sondergaard 2013) from a chosen initial phase.

    ``init_phase``: an array of phase angles (or a complex spectrogram whose angle is taken),
    typically the reverberant phase; ``"zero"``; or ``"random"``/``None`` (uniform, seeded by
    ``seed``). ``momentum`` is FGLA's alpha (0 gives classic Griffin-Lim). The update follows
    librosa: ``angles <- phase(T - alpha/(1+alpha) * T_prev)`` with ``T = STFT(ISTFT(S e^{j
    angles}))``, which equals Perraudin's ``T + alpha (T - T_prev)`` up to a positive scale.

    Returns ``(signal, history)``: the float32 signal ``ISTFT(|S| e^{j angles})`` of ``length``
    samples (default ``(frames - 1) * hop``) and, per iteration, the spectral convergence
    ``|| |S| - |STFT(x_n)| ||_F / ||S||_F`` of that iteration's signal (FGLA is not strictly
    monotone; the history shows it).
    """
    mag = _check_magnitude(magnitude, config)
    n_frames = mag.shape[0]
    length = _default_length(n_frames, config) if length is None else int(length)
    if config.n_frames(length) != n_frames:
        raise ValueError(f"length {length} gives {config.n_frames(length)} frames, not {n_frames}")

    if isinstance(init_phase, str) or init_phase is None:
        kind = "random" if init_phase is None else init_phase
        if kind == "zero":
            angles = np.zeros_like(mag)
        elif kind == "random":
            angles = np.random.default_rng(seed).uniform(-np.pi, np.pi, size=mag.shape)
        else:
            raise ValueError(f"init_phase must be an array, 'zero' or 'random', got {kind!r}")
    else:
        init = np.asarray(init_phase)
        if init.shape != mag.shape:
            raise ValueError(f"init_phase shape {init.shape} != magnitude shape {mag.shape}")
        angles = (np.angle(init) if np.iscomplexobj(init) else init).astype(np.float64)

    window = _window(config)
    s = torch.from_numpy(mag)
    phase = torch.polar(torch.ones_like(s), torch.from_numpy(angles))
    s_norm = max(float(torch.linalg.vector_norm(s)), _EPS)
    alpha = momentum / (1.0 + momentum)
    previous = torch.zeros_like(phase)
    history: list[float] = []
    for _ in range(n_iter):
        rebuilt = _stft_t(_istft_t(s * phase, config, window, length), config, window)
        history.append(float(torch.linalg.vector_norm(s - rebuilt.abs())) / s_norm)
        update = rebuilt - alpha * previous
        phase = update / (update.abs() + _EPS)
        previous = rebuilt
    signal = _istft_t(s * phase, config, window, length)
    return signal.numpy().astype(np.float32), history


def _relative_lr(lr: float, reference: torch.Tensor) -> float:
    rms = float(torch.sqrt(torch.mean(reference**2)))
    return lr * max(rms, 1e-8)


def gd_refine(
    magnitude: np.ndarray,
    config: StftConfig,
    init_signal: np.ndarray,
    n_iter: int = 100,
    lr: float = 0.01,
) -> tuple[np.ndarray, list[float]]:
    """Refine a waveform by Adam on the samples to match a target STFT magnitude.

    Loss: spectral convergence ``|| |S| - |STFT(x)| ||_F / ||S||_F`` (the Frobenius/L2 distance
    normalised by the target energy). Griffin-Lim stalls in a local optimum where the projection
    steps stop making progress; the gradient continues from there. Start it from the Griffin-Lim
    result (from the reverberant phase): from a random signal it finds a far worse optimum.

    ``lr`` is relative to the RMS of ``init_signal`` so one setting works at any recording level.
    Lower spectral convergence is not always better sounding: on a 3 s speech-like test signal
    after 100 FGLA iterations, lr 0.01 raised PESQ-WB slightly (4.46 -> 4.51) while lr 0.1
    reached a lower loss but dropped PESQ to 3.46 (Adam noise in low-energy regions, which the
    energy-normalised loss barely sees). Keep lr small.
    Returns the signal with the lowest loss seen (Adam is not monotone) and the loss per
    iteration (entry 0 is the loss of ``init_signal``).
    """
    mag = _check_magnitude(magnitude, config)
    x0 = torch.from_numpy(np.asarray(init_signal, dtype=np.float64).copy())
    if config.n_frames(x0.numel()) != mag.shape[0]:
        raise ValueError(
            f"init_signal gives {config.n_frames(x0.numel())} frames, magnitude has {mag.shape[0]}"
        )
    window = _window(config)
    s = torch.from_numpy(mag)
    s_norm = max(float(torch.linalg.vector_norm(s)), _EPS)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=_relative_lr(lr, x0))

    def loss_fn(sig: torch.Tensor) -> torch.Tensor:
        spec = _stft_t(sig, config, window)
        est = torch.sqrt(spec.real**2 + spec.imag**2 + _EPS)
        return torch.linalg.vector_norm(s - est) / s_norm

    history: list[float] = []
    best = x0.clone()
    best_loss = float("inf")
    for _ in range(n_iter + 1):
        opt.zero_grad()
        loss = loss_fn(x)
        value = loss.item()
        history.append(value)
        if value < best_loss:
            best_loss, best = value, x.detach().clone()
        if len(history) > n_iter:
            break
        loss.backward()
        opt.step()
    return best.numpy().astype(np.float32), history


# ---------------------------------------------------------------------------------------------
# mel inversion


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    fs: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """HTK-style mel filterbank, shape ``(n_mels, n_fft // 2 + 1)``.

    HTK mel scale ``2595 log10(1 + f/700)``, triangles between adjacent mel-spaced edge
    frequencies evaluated at the exact FFT bin frequencies, unit peak height (no Slaney area
    normalisation). Same as ``torchaudio.functional.melscale_fbanks(norm=None,
    mel_scale="htk")`` and Ellis' ``fft2melmx(..., htkmel=1, constamp=1)``.
    """
    fmax = fs / 2.0 if fmax is None else float(fmax)
    if not 0.0 <= fmin < fmax <= fs / 2.0:
        raise ValueError(f"need 0 <= fmin < fmax <= fs/2, got fmin={fmin}, fmax={fmax}")
    freqs = np.arange(n_fft // 2 + 1) * fs / n_fft
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lo) / (mid - lo)
    falling = (hi - freqs[None, :]) / (hi - mid)
    return np.maximum(0.0, np.minimum(rising, falling))


def mel_spectrogram(
    signal: np.ndarray,
    fs: int,
    config: StftConfig,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Magnitude mel spectrogram ``|STFT(x)| @ fb.T``, shape (frames, n_mels) (not power)."""
    fb = mel_filterbank(fs, config.n_fft, n_mels, fmin, fmax)
    return np.abs(stft(np.asarray(signal, dtype=np.float64), config)).astype(np.float64) @ fb.T


def mel_invert(
    mel: np.ndarray,
    fs: int,
    config: StftConfig,
    n_mels: int,
    method: Literal["gla", "gla+gd"] = "gla",
    n_iter: int = 100,
    gd_iter: int = 100,
    lr: float = 0.003,
    fmin: float = 0.0,
    fmax: float | None = None,
    length: int | None = None,
    init_phase: np.ndarray | Literal["zero", "random"] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Signal from a magnitude mel spectrogram (frames, n_mels) as made by :func:`mel_spectrogram`.

    ``"gla"``: linear magnitude ``max(mel @ pinv(fb).T, 0)`` (pseudo-inverse of the filterbank,
    negative lobes clipped), then fast Griffin-Lim from ``init_phase`` (random by default, so
    the output's SI-SDR is meaningless; pass the reverberant phase when there is one).
    ``"gla+gd"``: continue with Adam jointly on a free linear magnitude ``M`` (started at the
    pseudo-inverse) and the waveform ``x`` (started at the Griffin-Lim output), minimising
    ``|| |STFT(x)| - M || / ||M||`` (STFT consistency) ``+ || M fb' - mel || / ||mel||`` (mel
    error). The pseudo-inverse only fills the filterbank's row space; letting ``M`` move lets
    the consistency term choose the null-space part. ``lr`` (relative to the signal RMS and to
    the magnitude scale) defaults lower than :func:`gd_refine`'s: on a speech-like test signal
    lr 0.003 lowered the mel error (0.019 -> 0.013) at unchanged PESQ, lr 0.01 lowered it
    further (0.010) but cost 0.45 PESQ.
    """
    mel = np.asarray(mel, dtype=np.float64)
    fb = mel_filterbank(fs, config.n_fft, n_mels, fmin, fmax)
    if mel.ndim != 2 or mel.shape[1] != n_mels:
        raise ValueError(f"mel must be (frames, {n_mels}), got {mel.shape}")
    linear = np.maximum(mel @ np.linalg.pinv(fb).T, 0.0)
    signal, _ = griffin_lim(linear, config, n_iter, init_phase=init_phase, length=length, seed=seed)
    if method == "gla":
        return signal
    if method != "gla+gd":
        raise ValueError(f"unknown method {method!r}; use 'gla' or 'gla+gd'")

    window = _window(config)
    fb_t = torch.from_numpy(fb)
    target = torch.from_numpy(mel)
    mel_norm = max(float(torch.linalg.vector_norm(target)), _EPS)
    x0 = torch.from_numpy(signal.astype(np.float64))
    x = x0.clone().requires_grad_(True)
    # Parametrise M by its square root so it stays non-negative without clipping gradients.
    root = torch.sqrt(torch.from_numpy(linear) + _EPS).requires_grad_(True)
    scale = max(float(torch.sqrt(torch.mean(torch.from_numpy(linear)))), 1e-8)
    opt = torch.optim.Adam(
        [{"params": [x], "lr": _relative_lr(lr, x0)}, {"params": [root], "lr": lr * scale}]
    )

    def loss_fn() -> torch.Tensor:
        spec = _stft_t(x, config, window)
        est = torch.sqrt(spec.real**2 + spec.imag**2 + _EPS)
        m = root**2
        consistency = torch.linalg.vector_norm(est - m) / torch.linalg.vector_norm(m).clamp_min(
            _EPS
        )
        mel_err = torch.linalg.vector_norm(m @ fb_t.T - target) / mel_norm
        return consistency + mel_err

    best, best_loss = x0.clone(), float("inf")
    for step in range(gd_iter + 1):
        opt.zero_grad()
        loss = loss_fn()
        if loss.item() < best_loss:
            best_loss, best = loss.item(), x.detach().clone()
        if step == gd_iter:
            break
        loss.backward()
        opt.step()
    return best.numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------
# dispatch


def reconstruct(
    magnitude: np.ndarray,
    reverberant_spec: np.ndarray,
    config: StftConfig,
    method: Literal["reverberant", "fgla", "gd"] = "fgla",
    length: int | None = None,
    n_iter: int = 100,
    gd_iter: int = 100,
    lr: float = 0.01,
    momentum: float = 0.99,
) -> np.ndarray:
    """Turn an estimated magnitude into a waveform; the single entry point for evaluation and
    enhancement so every report names one of three well-defined methods.

    - ``"reverberant"``: ``ISTFT(|S| e^{j angle(Y)})`` with the reverberant STFT ``Y``;
    - ``"fgla"``: fast Griffin-Lim (``n_iter`` iterations) started from the reverberant phase;
    - ``"gd"``: ``"fgla"`` followed by ``gd_iter`` Adam steps of :func:`gd_refine`.

    ``length`` defaults to ``(frames - 1) * hop``; pass the input length to get it back exactly.
    """
    mag = _check_magnitude(magnitude, config)
    rev = np.asarray(reverberant_spec)
    if rev.shape != mag.shape:
        raise ValueError(f"reverberant_spec shape {rev.shape} != magnitude shape {mag.shape}")
    length = _default_length(mag.shape[0], config) if length is None else int(length)
    if method == "reverberant":
        window = _window(config)
        spec = torch.from_numpy(mag * np.exp(1j * np.angle(rev)))
        return _istft_t(spec, config, window, length).numpy().astype(np.float32)
    if method not in ("fgla", "gd"):
        raise ValueError(f"unknown method {method!r}; use 'reverberant', 'fgla' or 'gd'")
    signal, _ = griffin_lim(
        mag, config, n_iter, init_phase=np.angle(rev), momentum=momentum, length=length
    )
    if method == "fgla":
        return signal
    refined, _ = gd_refine(mag, config, signal, n_iter=gd_iter, lr=lr)
    return refined
