"""Kaldi-compatible MFCC and log-mel filterbank features in torch: batched, float32, CPU or GPU.

Numbers match Kaldi's ``compute-mfcc-feats`` / ``compute-fbank-feats`` (and kaldi-native-fbank,
``torchaudio.compliance.kaldi``) with ``snip_edges=true`` and ``dither=0``:

* framing: 25 ms windows every 10 ms, only whole windows (``snip_edges``), done with ``Tensor.unfold``
  (``torch.stft`` centres and pads frames, which is not Kaldi's framing);
* per frame: remove the DC offset, pre-emphasis 0.97 (first sample against itself, as Kaldi does),
  Povey window, zero-pad to 512, power spectrum, triangular mel filters (Kaldi's mel scale
  ``1127 ln(1 + f/700)``, 20 Hz to Nyquist), log with a floor at float32 epsilon;
* MFCC: orthonormal DCT-II of the log-mel energies (23 bins), first 13 coefficients, cepstral lifter 22.
  ``use_energy=false``: C0 is the 0th cepstrum, not the log frame energy (fairseq HuBERT iteration 1).

**Input scale.** The waveform is used as given. The default convention is fairseq's: float samples in
``[-1, 1]`` (what ``soundfile`` and ``speechssl.audio.load_audio`` return). Kaldi's binaries read int16 values,
i.e. ``32768`` times larger; this adds ``2 ln 32768 ≈ 20.79`` to every log-mel energy, hence the same offset to
every fbank bin and ``sqrt(num_mel_bins) * 20.79`` to MFCC C0, and nothing else (other DCT rows sum to zero),
except where a frame's energies touch the log floor. Multiply the input by 32768 to get Kaldi's own numbers.

**Batches.** ``wav`` is ``[S]`` (-> ``[T, D]``) or ``[B, S]`` (-> ``[B, T, D]``, ``T`` from the longest row).
Pass ``lengths`` (valid samples per row) for padded batches: frame ``t`` of row ``b`` only touches samples
``< lengths[b]`` when ``t < num_frames(lengths[b])``, deltas replicate each row's own last valid frame and CMVN
statistics use valid frames only, so every row equals the unbatched result on its own samples; frames past a
row's ``num_frames`` are set to zero. Cut them with ``num_frames``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from speechssl.errors import UserError

__all__ = ["mfcc", "fbank", "num_frames", "add_deltas", "apply_cmvn", "mel_banks", "dct_matrix", "FLOAT_EPS"]

FLOAT_EPS = float(torch.finfo(torch.float32).eps)  # Kaldi's floor before the log: std::numeric_limits<float>::epsilon()
INT16_LOG_OFFSET = 2.0 * math.log(32768.0)  # log-energy difference between int16-scaled and [-1, 1] input


def _frame_sizes(sample_rate: int, frame_length_ms: float, frame_shift_ms: float) -> tuple[int, int]:
    """Window and shift in samples, as Kaldi computes them."""
    return int(sample_rate * frame_length_ms * 0.001), int(sample_rate * frame_shift_ms * 0.001)


def num_frames(
    num_samples: int, *, sample_rate: int = 16000, frame_shift_ms: float = 10.0, frame_length_ms: float = 25.0
) -> int:
    """Number of frames Kaldi produces for ``num_samples`` samples with ``snip_edges=true``.

    ``1 + (S - L) // shift`` for ``S >= L`` (L = window length), else 0: only whole windows.
    """
    length, shift = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    num_samples = int(num_samples)
    return 0 if num_samples < length else 1 + (num_samples - length) // shift


def _num_frames_tensor(lengths: Tensor, length: int, shift: int) -> Tensor:
    """Vectorised ``num_frames`` on a tensor of sample counts."""
    return torch.where(lengths < length, torch.zeros_like(lengths), 1 + (lengths - length).clamp(min=0) // shift)


def _mel_scale(freq: Tensor | float) -> Tensor:
    """Kaldi's mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)


@functools.lru_cache(maxsize=32)
def _mel_banks_cpu(num_bins: int, padded_len: int, sample_rate: int, low_freq: float, high_freq: float) -> Tensor:
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0.0 <= low_freq < high <= nyquist:
        raise UserError(f"bad mel range: low_freq={low_freq}, high_freq={high_freq} at {sample_rate} Hz")
    num_fft_bins = padded_len // 2
    mel_low, mel_high = _mel_scale(low_freq), _mel_scale(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel_scale(torch.arange(num_fft_bins, dtype=torch.float64) * (sample_rate / padded_len)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    w = torch.where(mel <= center, up, down)
    w = torch.where((mel > left) & (mel < right), w, torch.zeros_like(w))
    # The Nyquist bin (index padded_len/2) gets weight 0, as in Kaldi's MelBanks.
    w = torch.cat([w, torch.zeros(num_bins, 1, dtype=torch.float64)], dim=1)
    if (w.sum(1) == 0).any():
        raise UserError(f"{num_bins} mel bins are too many for a {padded_len}-point FFT: some bins are empty")
    return w.t().contiguous()  # [padded_len/2 + 1, num_bins]


def mel_banks(
    num_bins: int, *, padded_len: int = 512, sample_rate: int = 16000, low_freq: float = 20.0, high_freq: float = 0.0
) -> Tensor:
    """Kaldi triangular mel filters as a float64 ``[padded_len/2 + 1, num_bins]`` matrix (power spectrum -> mel).

    ``high_freq <= 0`` is an offset from Nyquist (Kaldi's convention).
    """
    return _mel_banks_cpu(num_bins, padded_len, sample_rate, float(low_freq), float(high_freq)).clone()


@functools.lru_cache(maxsize=32)
def _dct_cpu(num_bins: int, num_ceps: int, lifter: float) -> Tensor:
    n = torch.arange(num_bins, dtype=torch.float64)
    k = torch.arange(num_ceps, dtype=torch.float64).unsqueeze(1)
    d = torch.cos(math.pi / num_bins * (n + 0.5) * k) * math.sqrt(2.0 / num_bins)
    d[0] = math.sqrt(1.0 / num_bins)
    if lifter != 0.0:
        d = d * (1.0 + 0.5 * lifter * torch.sin(math.pi * k / lifter))
    return d.t().contiguous()  # [num_bins, num_ceps]


@functools.lru_cache(maxsize=32)
def _dct_padded_cpu(num_bins: int, num_ceps: int, lifter: float, padded_bins: int) -> Tensor:
    """DCT with zero rows for the padding mel columns of ``_log_mel``."""
    d = _dct_cpu(num_bins, num_ceps, lifter)
    return torch.cat([d, d.new_zeros(padded_bins - num_bins, num_ceps)])


def dct_matrix(num_bins: int, num_ceps: int, cepstral_lifter: float = 22.0) -> Tensor:
    """Kaldi's orthonormal DCT-II (first ``num_ceps`` rows) with the lifter folded in: float64 ``[bins, ceps]``."""
    if not 0 < num_ceps <= num_bins:
        raise UserError(f"need 0 < num_ceps <= num_mel_bins, got {num_ceps} > {num_bins}")
    return _dct_cpu(num_bins, num_ceps, float(cepstral_lifter)).clone()


@functools.lru_cache(maxsize=16)
def _povey_window_cpu(length: int) -> Tensor:
    n = torch.arange(length, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / (length - 1))).pow(0.85)


_DEVICE_CACHE: dict[tuple, Tensor] = {}


def _on(t: Tensor, key: tuple, device: torch.device) -> Tensor:
    """A float32 copy of a cached float64 constant on ``device`` (cached: no host->device copy per call)."""
    k = key + (str(device),)
    v = _DEVICE_CACHE.get(k)
    if v is None:
        v = _DEVICE_CACHE[k] = t.to(device=device, dtype=torch.float32)
    return v


def _log_mel(
    wav: Tensor,
    *,
    sample_rate: int,
    num_mel_bins: int,
    frame_length_ms: float,
    frame_shift_ms: float,
    low_freq: float,
    high_freq: float,
    preemphasis: float,
    remove_dc_offset: bool,
    dither: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Log mel energies of a ``[B, S]`` float32 batch (Kaldi framing, snip_edges).

    Returns ``[B, T, P]`` with ``P`` = ``num_mel_bins`` rounded up to a multiple of 8; columns past
    ``num_mel_bins`` are padding (constant log(FLOAT_EPS)) for fast matmuls, to be dropped by the caller.
    """
    length, shift = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    padded = 1 << (length - 1).bit_length()  # round_to_power_of_two
    batch, samples = wav.shape
    device = wav.device
    if samples < length:
        return wav.new_zeros(batch, 0, num_mel_bins + (-num_mel_bins % _BIN_MULTIPLE))
    frames = wav.unfold(-1, length, shift)  # [B, T, L] view, no copy
    if dither != 0.0:
        frames = frames + dither * torch.randn(frames.shape, generator=generator, device=device, dtype=frames.dtype)
        emph_frames = torch.cat([frames[..., :1], frames[..., 1:] - preemphasis * frames[..., :-1]], dim=-1)
    else:
        # Within a frame, pre-emphasis x[i] - p x[i-1] (i >= 1) is the signal-level pre-emphasis, so it is
        # computed once on the waveform (2.5x fewer samples than the overlapping frames) and framed as a view;
        # only column 0 (Kaldi: x[0] - p x[0]) is fixed below.
        sig = torch.empty_like(wav)
        sig[:, 1:] = wav[:, 1:] - preemphasis * wav[:, :-1]
        sig[:, 0] = 0.0
        emph_frames = sig.unfold(-1, length, shift)
    num = frames.shape[1]
    window = _on(_povey_window_cpu(length), ("povey", length), device)
    mel_key = (num_mel_bins, padded, sample_rate, float(low_freq), float(high_freq))
    mel2 = _on(_mel2_cpu(*mel_key), ("mel2",) + mel_key, device)
    padded_bins = mel2.shape[1]
    if device.type != "cpu":
        return _frames_to_log_mel(frames, emph_frames, window, mel2, padded, preemphasis, remove_dc_offset)
    # On CPU, blocks of ~CPU_BLOCK_FRAMES frames keep the FFT buffers in cache (measured: ~1.5x faster than
    # one pass over a 120 s batch); on GPU one pass over the whole batch is best.
    out = wav.new_empty(batch, num, padded_bins)
    step = max(1, CPU_BLOCK_FRAMES // batch)
    for t0 in range(0, num, step):
        t1 = min(num, t0 + step)
        out[:, t0:t1] = _frames_to_log_mel(
            frames[:, t0:t1], emph_frames[:, t0:t1], window, mel2, padded, preemphasis, remove_dc_offset
        )
    return out


CPU_BLOCK_FRAMES = 256
_BIN_MULTIPLE = 8  # matmuls with 23 output columns run at half the speed of 24 (measured, MKL sgemm)


@functools.lru_cache(maxsize=32)
def _mel2_cpu(num_bins: int, padded_len: int, sample_rate: int, low_freq: float, high_freq: float) -> Tensor:
    """Mel matrix for the interleaved (re, im) squared spectrum: rows repeated twice, columns zero-padded to a
    multiple of 8 (the padded columns come out as log(FLOAT_EPS) and are dropped or ignored by the callers)."""
    mel = _mel_banks_cpu(num_bins, padded_len, sample_rate, low_freq, high_freq).repeat_interleave(2, dim=0)
    extra = -num_bins % _BIN_MULTIPLE
    return torch.cat([mel, mel.new_zeros(mel.shape[0], extra)], dim=1)


def _frames_to_log_mel(
    frames: Tensor,
    emph_frames: Tensor,
    window: Tensor,
    mel2: Tensor,
    padded: int,
    preemphasis: float,
    remove_dc_offset: bool,
) -> Tensor:
    """Raw frames ``[B, T, L]`` and their pre-emphasised version (column 0 unset) -> log mel ``[B, T, bins]``."""
    batch, num, length = frames.shape
    # Frames go straight into a zero-padded FFT buffer (the pad columns stay zero).
    buf = frames.new_empty(batch, num, padded)
    buf[..., length:].zero_()
    body = buf[..., :length]
    # Removing the mean m first equals subtracting (1 - p) m after the (linear) pre-emphasis.
    if remove_dc_offset:
        mean = frames.mean(dim=-1, keepdim=True)
        torch.sub(emph_frames, (1.0 - preemphasis) * mean, out=body)
        body[..., 0] = (1.0 - preemphasis) * (frames[..., 0] - mean[..., 0])
    else:
        body.copy_(emph_frames)
        body[..., 0] = (1.0 - preemphasis) * frames[..., 0]
    body.mul_(window)
    spec = torch.fft.rfft(buf)  # [B, T, padded/2 + 1] complex
    # |X|^2 @ mel without strided real/imag views: square the interleaved (re, im) floats in one contiguous
    # pass and multiply by the mel matrix with each row repeated for re and im.
    sq = torch.view_as_real(spec).reshape(batch, num, 2 * (padded // 2 + 1)).square_()
    return torch.matmul(sq, mel2).clamp_(min=FLOAT_EPS).log_()


def _as_batch(wav: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None, bool]:
    """``[S]`` or ``[B, S]`` -> float32 ``[B, S]``, lengths on the same device, and whether to squeeze."""
    if not isinstance(wav, Tensor):
        wav = torch.as_tensor(wav)
    if wav.dim() not in (1, 2):
        raise ValueError(f"waveform must be [S] or [B, S], got shape {tuple(wav.shape)}")
    squeeze = wav.dim() == 1
    wav = wav.unsqueeze(0) if squeeze else wav
    if not wav.is_floating_point():
        raise ValueError(f"waveform must be floating point (float samples in [-1, 1]), got {wav.dtype}")
    wav = wav.to(torch.float32)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=wav.device).long().reshape(-1)
        if lengths.numel() != wav.shape[0] or bool((lengths > wav.shape[1]).any()) or bool((lengths < 0).any()):
            raise ValueError(f"lengths {lengths.tolist()} do not fit a batch of shape {tuple(wav.shape)}")
    return wav, lengths, squeeze


def _filter_clamped(x: Tensor, taps: Tensor, valid: Tensor) -> Tensor:
    """``y[b, t] = sum_j taps[j] x[b, clamp(t + j - c, 0, valid[b] - 1)]`` (edge replication per row).

    One gather builds the edge-replicated, padded copy ``[B, T + 2c, D]``; the taps are then shifted slices.
    """
    batch, frames, dim = x.shape
    half = (taps.numel() - 1) // 2
    if bool((valid == frames).all()):
        padded = torch.cat([x[:, :1].expand(batch, half, dim), x, x[:, -1:].expand(batch, half, dim)], dim=1)
    else:
        pos = torch.arange(-half, frames + half, device=x.device).view(1, -1)
        idx = torch.minimum(pos.clamp(min=0), (valid - 1).clamp(min=0).view(-1, 1))  # [B, T + 2c]
        padded = torch.gather(x, 1, idx.unsqueeze(-1).expand(batch, frames + 2 * half, dim))
    out: Tensor | None = None
    for k, w in enumerate(taps.tolist()):
        if w == 0.0:
            continue
        if out is None:
            out = padded[:, k : k + frames] * w
        else:
            out.add_(padded[:, k : k + frames], alpha=w)
    return out if out is not None else torch.zeros_like(x)


def add_deltas(feats: Tensor, *, order: int = 2, window: int = 2, mode: str = "fairseq", lengths: Tensor | None = None) -> Tensor:
    """Append delta features: ``[.., T, D] -> [.., T, D * (order + 1)]``, edge frames replicated.

    ``lengths`` (frames per row, for ``[B, T, D]``) makes each row replicate its own last valid frame.
    ``mode="fairseq"`` (default, what HuBERT iteration 1 was trained on) and ``mode="kaldi"`` (``add-deltas``)
    agree on the first-order deltas everywhere and on higher orders except the first/last ``window * (order-1)``
    frames, where Kaldi replicates the static features and fairseq replicates the deltas.
    """
    if mode not in ("fairseq", "kaldi"):
        raise UserError(f"delta mode must be 'fairseq' or 'kaldi', got {mode!r}")
    squeeze = feats.dim() == 2
    x = feats.unsqueeze(0) if squeeze else feats
    batch, frames, _ = x.shape
    valid = (
        torch.full((batch,), frames, device=x.device, dtype=torch.long)
        if lengths is None
        else torch.as_tensor(lengths, device=x.device).long().reshape(-1)
    )
    outs = [x]
    if frames > 0:
        base = torch.arange(-window, window + 1, dtype=torch.float64)
        base = base / (2.0 * (base[window + 1 :] ** 2).sum())
        if mode == "fairseq":
            cur = x
            for _ in range(order):
                cur = _filter_clamped(cur, base, valid)
                outs.append(cur)
        else:
            taps = torch.ones(1, dtype=torch.float64)
            for _ in range(order):
                taps = _full_convolve(taps, base)
                outs.append(_filter_clamped(x, taps, valid))
    else:
        outs += [x] * order
    y = torch.cat(outs, dim=-1)
    y = _zero_tail(y, valid)
    return y.squeeze(0) if squeeze else y


def _full_convolve(a: Tensor, b: Tensor) -> Tensor:
    """Full 1-d convolution of two short float64 vectors (Kaldi builds higher-order delta taps this way)."""
    out = torch.zeros(a.numel() + b.numel() - 1, dtype=torch.float64)
    for i in range(a.numel()):
        out[i : i + b.numel()] += a[i] * b
    return out


def _zero_tail(x: Tensor, valid: Tensor) -> Tensor:
    """Zero frames ``t >= valid[b]`` of a ``[B, T, D]`` tensor."""
    if x.shape[1] == 0 or bool((valid >= x.shape[1]).all()):
        return x
    keep = torch.arange(x.shape[1], device=x.device).view(1, -1) < valid.view(-1, 1)
    return x * keep.unsqueeze(-1).to(x.dtype)


def apply_cmvn(feats: Tensor, *, variance: bool = False, lengths: Tensor | None = None) -> Tensor:
    """Per-utterance cepstral mean (and optionally variance) normalisation over valid frames.

    ``[T, D]`` or ``[B, T, D]``; ``lengths`` gives valid frames per row. Variance is floored at 1e-10.
    """
    squeeze = feats.dim() == 2
    x = feats.unsqueeze(0) if squeeze else feats
    batch, frames, _ = x.shape
    valid = (
        torch.full((batch,), frames, device=x.device, dtype=torch.long)
        if lengths is None
        else torch.as_tensor(lengths, device=x.device).long().reshape(-1)
    )
    mask = (torch.arange(frames, device=x.device).view(1, -1) < valid.view(-1, 1)).unsqueeze(-1).to(x.dtype)
    count = valid.clamp(min=1).to(torch.float64).view(-1, 1, 1)
    xd = x.to(torch.float64) * mask
    mean = xd.sum(1, keepdim=True) / count
    y = x.to(torch.float64) - mean
    if variance:
        var = ((y * mask) ** 2).sum(1, keepdim=True) / count
        y = y / var.clamp(min=1e-10).sqrt()
    y = (y * mask).to(x.dtype)
    return y.squeeze(0) if squeeze else y


def _cmvn_mode(cmvn: bool | str) -> str | None:
    """``False`` -> None; ``True``/``"mean"`` -> "mean"; ``"meanvar"`` -> "meanvar"."""
    if cmvn is False or cmvn is None:
        return None
    if cmvn is True or cmvn == "mean":
        return "mean"
    if cmvn == "meanvar":
        return "meanvar"
    raise UserError(f"cmvn must be False, True/'mean' or 'meanvar', got {cmvn!r}")


def fbank(
    wav: Tensor,
    *,
    sample_rate: int = 16000,
    num_mel_bins: int = 80,
    cmvn: bool | str = False,
    lengths: Tensor | None = None,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    dither: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Kaldi log-mel filterbank (``use_energy=false``): ``[S] -> [T, num_mel_bins]``, ``[B, S] -> [B, T, bins]``.

    ``cmvn``: False, True/"mean" (mean normalisation) or "meanvar", per utterance. ``dither`` > 0 adds
    Gaussian noise of that standard deviation per frame (Kaldi's dither; default 0 = deterministic).
    See the module docstring for the input scale and padded batches.
    """
    x, lens, squeeze = _as_batch(wav, lengths)
    length, shift = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    out = _log_mel(
        x,
        sample_rate=sample_rate,
        num_mel_bins=num_mel_bins,
        frame_length_ms=frame_length_ms,
        frame_shift_ms=frame_shift_ms,
        low_freq=low_freq,
        high_freq=high_freq,
        preemphasis=preemphasis,
        remove_dc_offset=remove_dc_offset,
        dither=dither,
        generator=generator,
    )
    if out.shape[-1] != num_mel_bins:
        out = out[..., :num_mel_bins].contiguous()
    out = _finish(out, lens, length, shift, cmvn)
    return out.squeeze(0) if squeeze else out


def _finish(out: Tensor, lens: Tensor | None, length: int, shift: int, cmvn: bool | str) -> Tensor:
    """Zero frames past each row's length and apply CMVN on the valid frames."""
    valid = None if lens is None else _num_frames_tensor(lens, length, shift)
    if valid is not None:
        out = _zero_tail(out, valid)
    mode = _cmvn_mode(cmvn)
    if mode is not None:
        out = apply_cmvn(out, variance=mode == "meanvar", lengths=valid)
    return out


def mfcc(
    wav: Tensor,
    *,
    sample_rate: int = 16000,
    num_ceps: int = 13,
    deltas: bool = True,
    cmvn: bool | str = False,
    lengths: Tensor | None = None,
    num_mel_bins: int = 23,
    cepstral_lifter: float = 22.0,
    delta_mode: str = "fairseq",
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    dither: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Kaldi MFCC (``use_energy=false``) + deltas: ``[S] -> [T, 39]``, ``[B, S] -> [B, T, 39]`` by default.

    The defaults are fairseq HuBERT iteration 1's features (``torchaudio.compliance.kaldi.mfcc(use_energy=False)``
    then ``compute_deltas`` twice). ``deltas=False`` gives the 13 static cepstra. ``cmvn`` (False, True/"mean",
    "meanvar") normalises the static cepstra per utterance before deltas are taken, as Kaldi's
    ``apply-cmvn | add-deltas`` does. ``delta_mode``: see ``add_deltas``. See the module docstring for the
    input scale and padded batches.
    """
    x, lens, squeeze = _as_batch(wav, lengths)
    length, shift = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    logmel = _log_mel(
        x,
        sample_rate=sample_rate,
        num_mel_bins=num_mel_bins,
        frame_length_ms=frame_length_ms,
        frame_shift_ms=frame_shift_ms,
        low_freq=low_freq,
        high_freq=high_freq,
        preemphasis=preemphasis,
        remove_dc_offset=remove_dc_offset,
        dither=dither,
        generator=generator,
    )
    if not 0 < num_ceps <= num_mel_bins:
        raise UserError(f"need 0 < num_ceps <= num_mel_bins, got num_ceps={num_ceps}, num_mel_bins={num_mel_bins}")
    dct_key = (num_mel_bins, num_ceps, float(cepstral_lifter), logmel.shape[-1])
    dct = _on(_dct_padded_cpu(*dct_key), ("dct",) + dct_key, x.device)
    out = torch.matmul(logmel, dct)
    out = _finish(out, lens, length, shift, cmvn)
    if deltas:
        valid = None if lens is None else _num_frames_tensor(lens, length, shift)
        out = add_deltas(out, order=2, window=2, mode=delta_mode, lengths=valid)
    return out.squeeze(0) if squeeze else out
