"""Phase reconstruction at equal wall time: does gradient descent after Griffin-Lim pay off?

Setting: a magnitude-domain dereverberation model estimates the clean magnitude; the phase has
to come from somewhere. Here the model is perfect (the ORACLE clean magnitude), so only the
phase method differs. Real speech (the first ``--files`` files of ``--speech`` at least
``--seconds`` long, cut to that length, 16 kHz) is reverberated with an RT60 ~0.6 s RIR
(synthetic exponentially decaying noise after a direct impulse, or a pyroomacoustics shoebox
with ``--rir room``); the clean reference is the dry speech aligned to the direct path and
scaled by its amplitude, as the project's ``direct`` target. Every method gets the same wall
time per utterance (``--budget-s``); iteration counts are calibrated first by timing a few
iterations of each (a fixed cost plus a cost per iteration) and printed with the time each
method actually took:

(0) unprocessed reverberant signal (for reference, not a method);
(a) oracle magnitude + reverberant phase, one inverse STFT (no iterations);
(b) fast Griffin-Lim (``training.phase.griffin_lim``) from the reverberant phase, whole budget;
(c) fast Griffin-Lim for half the budget, then ``training.phase.gd_refine`` (Adam on the
    waveform) for the other half;
(d) ``gd_refine`` alone from the signal of (a), whole budget;
(e) fast Griffin-Lim from a random phase, whole budget (shows why its SI-SDR is meaningless);
mel: an 80-band mel spectrogram of the clean signal inverted by ``training.phase.mel_invert``,
    "gla" (whole budget) against "gla+gd" (half and half), both from the reverberant phase
    unless ``--mel-init random``.

Scores, means over files: spectral convergence ``|| |S| - |STFT(x)| || / ||S||`` against the
oracle magnitude (and the same on the mel spectrogram), PESQ-WB (``training.metrics.pesq_wb``)
and SI-SDR against the clean signal. Griffin-Lim and gradient descent change the phase:
SI-SDR measures waveform agreement and means something only when the iterations start from
the reverberant phase, which anchors the signal in time and sign; from a random start it
converges to a shifted or sign-flipped consistent signal, so its SI-SDR is meaningless
(marked in the table). The last lines give the verdict: (c) against (b), paired per file.

Also printed: the wall time of 5000 iterations of fast Griffin-Lim and of ``gd_refine`` on one
utterance (``--quick`` times 500 and extrapolates, and says so). Everything runs on one torch
thread; the load average is printed, since timings on a shared machine vary.

    python benchmarks/phase_methods.py [--speech ../shared/data/speech --files 8 --seconds 3
                                        --budget-s 2.0 --rir synthetic|room --quick]
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PRA_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402  (thread limits must be set before numpy loads BLAS)
import torch  # noqa: E402
from scipy.signal import fftconvolve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dereverb_data.acoustics import direct_path_index, drr_db, reverberation_time  # noqa: E402
from dereverb_data.corpus import read_audio  # noqa: E402
from dereverb_data.render import direct_amplitude  # noqa: E402
from dereverb_data.stft import StftConfig, istft, stft  # noqa: E402
from training.metrics import MetricUnavailable, pesq_wb, si_sdr  # noqa: E402
from training.phase import (  # noqa: E402
    gd_refine,
    griffin_lim,
    mel_filterbank,
    mel_invert,
    mel_spectrogram,
    spectral_convergence,
)

FS = 16000
CONFIG = StftConfig(n_fft=512, hop=128, window="hann")
N_MELS = 80
TIMING_ITERATIONS = 5000

# ---------------------------------------------------------------------------------------------
# Data: speech, RIR, the oracle


def load_speech(
    folder: Path, n_files: int, seconds: float
) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """The first ``n_files`` files (sorted paths) at least ``seconds`` long, cut to it."""
    n = round(seconds * FS)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".wav", ".flac"))
    chosen, skipped = [], []
    for path in files:
        if len(chosen) == n_files:
            break
        signal, _, _ = read_audio(path, FS)
        name = str(path.relative_to(folder))
        if signal.size < n:
            skipped.append(f"{name} ({signal.size / FS:.2f} s)")
            continue
        chosen.append((name, signal[:n].astype(np.float64)))
    if not chosen:
        raise SystemExit(f"no audio file of at least {seconds} s under {folder}")
    return chosen, skipped


def synthetic_rir(rt60: float, drr: float, seed: int) -> np.ndarray:
    """A unit direct impulse, then Gaussian noise decaying by 60 dB in ``rt60`` seconds.

    The tail starts after the 2.5 ms direct window and has ``10^(-drr/10)`` times the direct
    energy, so the measured DRR is ``drr`` dB.
    """
    rng = np.random.default_rng(seed)
    length = round(1.5 * rt60 * FS)
    n = np.arange(length)
    tail = rng.standard_normal(length) * 10.0 ** (-3.0 * n / (rt60 * FS))
    tail[: round(0.0025 * FS) + 1] = 0.0
    tail *= np.sqrt(10.0 ** (-drr / 10.0) / np.sum(tail**2))
    tail[0] = 1.0
    return tail


def room_rir(rt60: float) -> np.ndarray:
    """pyroomacoustics shoebox (6 x 5 x 3 m, pure image method, source 1.2 m from the mic),
    absorption rescaled until the measured T30 is within 10% of ``rt60`` (``inverse_sabine``
    alone overshoots)."""
    import pyroomacoustics as pra

    dims = [6.0, 5.0, 3.0]
    absorption, order = pra.inverse_sabine(rt60, dims)
    for _ in range(4):
        room = pra.ShoeBox(dims, fs=FS, materials=pra.Material(absorption), max_order=order)
        room.add_source([2.5, 2.5, 1.6])
        room.add_microphone([3.6, 2.2, 1.2])  # 1.2 m away: DRR about -3 dB at RT60 0.6 s
        room.compute_rir()
        h = np.asarray(room.rir[0][0], dtype=np.float64)
        measured = reverberation_time(h, FS)
        if abs(measured / rt60 - 1) < 0.1:
            break
        absorption = min(0.99, absorption * measured / rt60)  # Sabine: RT60 ~ 1 / absorption
    return h


@dataclass
class Utterance:
    name: str
    clean: np.ndarray  # the direct-path target, float64
    reverberant: np.ndarray
    magnitude: np.ndarray  # oracle |STFT(clean)|, (frames, freq)
    reverberant_spec: np.ndarray  # STFT(reverberant), complex
    mel: np.ndarray  # mel spectrogram of clean, (frames, N_MELS)


def make_utterance(name: str, dry: np.ndarray, h: np.ndarray) -> Utterance:
    n = dry.size
    d = direct_path_index(h)
    clean = np.zeros(n)
    clean[d:] = direct_amplitude(h, d, FS) * dry[: n - d]
    reverberant = fftconvolve(dry, h)[:n]
    gain = 10 ** (-25 / 20) / np.sqrt(np.mean(reverberant**2))  # -25 dBFS RMS, both signals
    clean, reverberant = clean * gain, reverberant * gain
    return Utterance(
        name=name,
        clean=clean,
        reverberant=reverberant,
        magnitude=np.abs(stft(clean, CONFIG)).astype(np.float64),
        reverberant_spec=stft(reverberant, CONFIG),
        mel=mel_spectrogram(clean, FS, CONFIG, N_MELS),
    )


# ---------------------------------------------------------------------------------------------
# Methods: each takes an utterance and its iteration plan, returns a waveform


def reverberant_phase_signal(u: Utterance) -> np.ndarray:
    spec = u.magnitude * np.exp(1j * np.angle(u.reverberant_spec))
    return istft(spec, CONFIG, u.clean.size).astype(np.float64)


def fgla(u: Utterance, n_iter: int, init: str = "reverberant", seed: int = 0) -> np.ndarray:
    init_phase = np.angle(u.reverberant_spec) if init == "reverberant" else "random"
    signal, _ = griffin_lim(
        u.magnitude, CONFIG, n_iter, init_phase=init_phase, length=u.clean.size, seed=seed
    )
    return signal


def gd(u: Utterance, start: np.ndarray, n_iter: int, lr: float) -> np.ndarray:
    signal, _ = gd_refine(u.magnitude, CONFIG, start, n_iter=n_iter, lr=lr)
    return signal


def mel_inversion(
    u: Utterance, method: str, n_iter: int, gd_iter: int, init: str, lr: float
) -> np.ndarray:
    init_phase = np.angle(u.reverberant_spec) if init == "reverberant" else "random"
    return mel_invert(
        u.mel,
        FS,
        CONFIG,
        N_MELS,
        method=method,
        n_iter=n_iter,
        gd_iter=gd_iter,
        lr=lr,
        length=u.clean.size,
        init_phase=init_phase,
    )


# ---------------------------------------------------------------------------------------------
# Calibration: wall time = fixed cost + iterations x cost per iteration


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Cost:
    fixed_s: float
    per_iter_s: float

    def iterations(self, seconds: float) -> int:
        """Most iterations that fit in ``seconds`` (at least 1)."""
        return max(1, int((seconds - self.fixed_s) / self.per_iter_s))


def calibrate(run: Callable[[int], object], target_s: float, small: int = 2) -> Cost:
    """Straight line through the median of 3 timings at ``small`` and at ``large`` iterations.

    ``large`` is first 12, then as many iterations as take about ``target_s`` by that first
    estimate (a longer timing averages out scheduling noise on a shared machine).
    """

    def line(large: int, t_small: float) -> Cost:
        t_large = float(np.median([_timed(lambda: run(large)) for _ in range(3)]))
        per_iter = max((t_large - t_small) / (large - small), 1e-6)
        return Cost(fixed_s=max(t_small - small * per_iter, 0.0), per_iter_s=per_iter)

    t_small = float(np.median([_timed(lambda: run(small)) for _ in range(3)]))
    rough = line(12, t_small)
    return line(max(12, int(target_s / rough.per_iter_s)), t_small)


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Row:
    label: str
    iterations: str
    anchored: bool  # phase anchored by the reverberant phase (SI-SDR meaningful)
    seconds: list[float] = field(default_factory=list)
    sc: list[float] = field(default_factory=list)
    mel_sc: list[float] = field(default_factory=list)
    pesq: list[float] = field(default_factory=list)
    si_sdr: list[float] = field(default_factory=list)


def score(row: Row, u: Utterance, signal: np.ndarray, seconds: float, fb: np.ndarray) -> None:
    signal = np.asarray(signal, dtype=np.float64)
    row.seconds.append(seconds)
    row.sc.append(spectral_convergence(u.magnitude, signal, CONFIG))
    mel = np.abs(stft(signal, CONFIG)).astype(np.float64) @ fb.T
    row.mel_sc.append(float(np.linalg.norm(mel - u.mel) / np.linalg.norm(u.mel)))
    for name, metric, values in (("pesq", pesq_wb, row.pesq), ("si_sdr", si_sdr, row.si_sdr)):
        try:
            values.append(metric(signal, u.clean, FS))
        except MetricUnavailable as exc:
            print(f"  {u.name}: {row.label}: {name} unavailable ({exc})")
            values.append(float("nan"))


def _mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'method':<46} {'iterations':>15} {'time s':>7} {'SC':>7} {'mel SC':>7} "
        f"{'PESQ-WB':>8} {'SI-SDR dB':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        sdr = f"{_mean(r.si_sdr):10.2f}" if r.anchored else f"{_mean(r.si_sdr):8.2f} *"
        missing = sum(1 for v in r.pesq if not np.isfinite(v))
        pesq = f"{_mean(r.pesq):8.3f}" + (f" ({missing} missing)" if missing else "")
        print(
            f"{r.label:<46} {r.iterations:>15} {_mean(r.seconds):7.2f} {_mean(r.sc):7.4f} "
            f"{_mean(r.mel_sc):7.4f} {pesq} {sdr}"
        )
    print(
        "SC: spectral convergence against the oracle magnitude (lower is better); mel SC: the "
        "same on the 80-band mel spectrogram.\n* random-start Griffin-Lim converges to a "
        "time-shifted/sign-flipped consistent signal: its SI-SDR is NOT meaningful."
    )


def verdict(label: str, base: Row, new: Row, budget: float) -> None:
    """Paired comparison of ``new`` against ``base`` over files, on PESQ-WB and SC."""
    pairs = [(b, n) for b, n in zip(base.pesq, new.pesq, strict=True) if np.isfinite(b + n)]
    gains = np.array([n - b for b, n in pairs])
    sc_change = _mean(new.sc) - _mean(base.sc)
    wins = int(np.sum(gains > 0))
    better = bool(gains.size and gains.mean() > 0 and wins > gains.size / 2)
    print(
        f"VERDICT ({label}): {'YES' if better else 'NO'}, at equal wall time ({budget:g} s per "
        f"utterance) {new.label.split(':')[0]} "
        f"{'improves' if better else 'does not improve'} on {base.label.split(':')[0]}: "
        f"PESQ-WB {_mean(base.pesq):.3f} -> {_mean(new.pesq):.3f} "
        f"({gains.mean() if gains.size else float('nan'):+.3f}, better on {wins}/{gains.size} "
        f"files), spectral convergence {_mean(base.sc):.4f} -> {_mean(new.sc):.4f} "
        f"({sc_change:+.4f}). Criterion: mean PESQ-WB gain > 0 and better on most files."
    )


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--speech", type=Path, default=REPO.parent / "shared/data/speech")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--budget-s", type=float, default=2.0, help="wall time per utterance")
    parser.add_argument("--rir", choices=("synthetic", "room"), default="synthetic")
    parser.add_argument("--rt60", type=float, default=0.6)
    parser.add_argument("--drr-db", type=float, default=0.0, help="synthetic RIR only")
    parser.add_argument("--lr", type=float, default=0.01, help="gd_refine learning rate")
    parser.add_argument("--mel-lr", type=float, default=0.003, help="mel_invert gla+gd lr")
    parser.add_argument("--mel-init", choices=("reverberant", "random"), default="reverberant")
    parser.add_argument(
        "--timing-iters", type=int, default=None, help="iterations actually timed (default 5000)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 files, 0.5 s budget, 500 timing iterations",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.budget_s = min(args.files, 2), min(args.budget_s, 0.5)
    timing_iters = args.timing_iters or (500 if args.quick else TIMING_ITERATIONS)

    print("$ " + shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])))
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread, CPU"
    )

    # --- data ---------------------------------------------------------------------------------
    speech, skipped = load_speech(args.speech, args.files, args.seconds)
    if args.rir == "synthetic":
        h = synthetic_rir(args.rt60, args.drr_db, args.seed)
        rir_text = f"synthetic exponential decay (seed {args.seed})"
    else:
        h = room_rir(args.rt60)
        rir_text = "pyroomacoustics shoebox 6x5x3 m, ISM, 1.2 m"
    print(
        f"RIR: {rir_text}, {h.size / FS:.2f} s; measured T30 {reverberation_time(h, FS):.3f} s, "
        f"DRR {drr_db(h, FS):.1f} dB (target RT60 {args.rt60} s)"
    )
    print(f"speech: {len(speech)} files from {args.speech}, cut to {args.seconds} s at {FS} Hz:")
    print("  " + ", ".join(name for name, _ in speech))
    if skipped:
        print(f"  skipped (shorter than {args.seconds} s): " + ", ".join(skipped))
    utterances = [make_utterance(name, dry, h) for name, dry in speech]
    fb = mel_filterbank(FS, CONFIG.n_fft, N_MELS)

    # --- calibrate iteration counts on the first utterance --------------------------------------
    u0, budget, half = utterances[0], args.budget_s, args.budget_s / 2
    start0 = reverberant_phase_signal(u0)
    mel_init, mel_lr, target = args.mel_init, args.mel_lr, budget / 4
    costs = {
        "fgla": calibrate(lambda k: fgla(u0, k), target),
        "gd_refine": calibrate(lambda k: gd(u0, start0, k, args.lr), target),
        "mel gla": calibrate(lambda k: mel_inversion(u0, "gla", k, 0, mel_init, mel_lr), target),
        "mel gd": calibrate(lambda k: mel_inversion(u0, "gla+gd", 1, k, mel_init, mel_lr), target),
    }
    print(f"\ncalibration ({args.seconds} s utterance): fixed cost + cost per iteration")
    for name, cost in costs.items():
        print(f"  {name:<10} {cost.fixed_s * 1000:7.1f} ms + {cost.per_iter_s * 1000:6.2f} ms/iter")
    n_fgla = costs["fgla"].iterations(budget)
    n_fgla_half, n_gd_half = costs["fgla"].iterations(half), costs["gd_refine"].iterations(half)
    n_gd = costs["gd_refine"].iterations(budget)
    n_mel = costs["mel gla"].iterations(budget)
    n_mel_half, n_mel_gd = costs["mel gla"].iterations(half), costs["mel gd"].iterations(half)

    mel_anchor = args.mel_init == "reverberant"
    rows = {
        "0": Row("(0) unprocessed reverberant (reference)", "-", True),
        "a": Row("(a) reverberant phase", "0", True),
        "b": Row("(b) fgla: from reverberant phase", f"{n_fgla}", True),
        "c": Row("(c) fgla+gd: half fgla, half gd_refine", f"{n_fgla_half}+{n_gd_half}", True),
        "d": Row("(d) gd: gd_refine from (a)", f"{n_gd}", True),
        "e": Row("(e) fgla from random phase", f"{n_fgla}", False),
        "mel_gla": Row(f"mel gla: mel_invert, {args.mel_init} init", f"{n_mel}", mel_anchor),
        "mel_gd": Row(
            f"mel gla+gd: mel_invert, {args.mel_init} init", f"{n_mel_half}+{n_mel_gd}", mel_anchor
        ),
    }

    # --- run --------------------------------------------------------------------------------------
    print(f"\nbudget {budget:g} s per utterance; running {len(utterances)} files ...")
    for i, u in enumerate(utterances):
        score(rows["0"], u, u.reverberant, 0.0, fb)

        def run(key: str, fn: Callable[[], np.ndarray], u: Utterance = u) -> np.ndarray:
            start = time.perf_counter()
            signal = fn()
            score(rows[key], u, signal, time.perf_counter() - start, fb)
            return signal

        start = run("a", lambda u=u: reverberant_phase_signal(u))
        run("b", lambda u=u: fgla(u, n_fgla))
        run("c", lambda u=u: gd(u, fgla(u, n_fgla_half), n_gd_half, args.lr))
        run("d", lambda u=u, start=start: gd(u, start, n_gd, args.lr))
        run("e", lambda u=u, i=i: fgla(u, n_fgla, init="random", seed=args.seed + i))
        run("mel_gla", lambda u=u: mel_inversion(u, "gla", n_mel, 0, mel_init, mel_lr))
        run(
            "mel_gd",
            lambda u=u: mel_inversion(u, "gla+gd", n_mel_half, n_mel_gd, mel_init, mel_lr),
        )

    print(f"\nmeans over {len(utterances)} files (time s: measured wall time per utterance)")
    print_table(list(rows.values()))
    off = [
        f"{rows[k].label.split(':')[0]} {_mean(rows[k].seconds):.2f} s"
        for k in ("b", "c", "d", "e", "mel_gla", "mel_gd")
        if abs(_mean(rows[k].seconds) / budget - 1) > 0.2
    ]
    if off:
        print(
            f"WARNING: more than 20% off the {budget:g} s budget (busy machine?): " + ", ".join(off)
        )

    # --- 5000 iterations ------------------------------------------------------------------------
    scale = TIMING_ITERATIONS / timing_iters
    t_fgla = _timed(lambda: fgla(u0, timing_iters)) * scale
    t_gd = _timed(lambda: gd(u0, start0, timing_iters, args.lr)) * scale
    how = (
        "measured"
        if timing_iters == TIMING_ITERATIONS
        else f"timed {timing_iters} iterations and extrapolated x{scale:g}"
    )
    print(f"\n{TIMING_ITERATIONS} iterations on one {args.seconds} s utterance ({how}):")
    print(f"  fgla       {t_fgla:7.1f} s  ({t_fgla / TIMING_ITERATIONS * 1000:.2f} ms/iter)")
    print(f"  gd_refine  {t_gd:7.1f} s  ({t_gd / TIMING_ITERATIONS * 1000:.2f} ms/iter)")

    print()
    verdict("linear magnitude", rows["b"], rows["c"], budget)
    verdict("mel inversion", rows["mel_gla"], rows["mel_gd"], budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
