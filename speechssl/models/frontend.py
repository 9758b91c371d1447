"""Frontends: waveform ``[B, S]`` -> frame features ``[B, T, C]`` plus the frame count of every row.

Two frontends share one interface (``forward(wavs, wav_lens) -> (features, frame_lens)``, ``num_frames``) and
one parameter prefix (``feature_extractor.conv_layers.N.conv``):

* :class:`ConvFeatureExtractor`, the wav2vec 2.0 / HuBERT waveform CNN (transformers' ``HubertFeatureEncoder``
  parameter names, so the state dict is a copy of transformers');
* :class:`FbankFeatureExtractor`, 80-d Kaldi fbank (``speechssl.features.kaldi.fbank``, no gradient) with
  per-utterance mean/variance normalisation and strided Conv1d subsampling: the cheap CPU frontend.

:class:`GradMultiply` is fairseq's: identity forward, gradient scaled by ``feature_grad_mult`` backward
(HuBERT Base trains its CNN with 0.1 of the gradient; 0 runs the frontend without autograd at all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.features.kaldi import fbank

from .config import HubertConfig

__all__ = ["GradMultiply", "ConvFeatureExtractor", "FbankFeatureExtractor", "build_frontend", "lengths_to_mask",
           "conv1d_matmul", "set_per_row_norm"]


class GradMultiply(torch.autograd.Function):
    """``y = x`` forward; ``dL/dx = scale * dL/dy`` backward (fairseq ``GradMultiply``)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``[B]`` lengths -> ``[B, max_len]`` bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device).view(1, -1) < lengths.view(-1, 1)


def _scale_grad(features: Tensor, feature_grad_mult: float) -> Tensor:
    if 0.0 < feature_grad_mult != 1.0 and features.requires_grad:
        return GradMultiply.apply(features, feature_grad_mult)
    return features


def conv1d_matmul(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """``conv(x)`` for ``x`` ``[B, C_in, T]`` as one matmul over overlapping windows (im2col): the windows are
    gathered from the time-major view and multiplied by the weight as a ``[C_out, C_in * kernel]`` matrix
    (same parameters, fp32 results within float rounding). oneDNN's bf16 Conv1d is slow on CPUs with AMX (9x slower
    than this for the waveform's 1-channel first layer, 1.4x for the 512-channel ones), where a bf16 matmul is not.
    Returns a ``[B, C_out, T']`` view of a time-major tensor, which the next layer reads without a copy."""
    (k,), (s,), (p,) = conv.kernel_size, conv.stride, conv.padding
    if p:
        x = F.pad(x, (p, p))
    if x.shape[-1] < k or conv.groups != 1 or conv.dilation != (1,):
        return F.conv1d(x, conv.weight, conv.bias, s)
    cols = x.transpose(1, 2).unfold(1, k, s)                  # [B, T', C_in, k]
    cols = cols.reshape(cols.shape[0], cols.shape[1], -1)     # [B, T', C_in * k]
    return F.linear(cols, conv.weight.reshape(conv.out_channels, -1), conv.bias).transpose(1, 2)


class _ConvLayer(nn.Module):
    """Conv1d -> optional norm -> GELU. ``norm`` is None, "group" (GroupNorm(dim, dim)) or "layer" (LN over
    channels). ``matmul``: the conv computed by :func:`conv1d_matmul` (the waveform CNN) instead of ``nn.Conv1d``."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, *, bias: bool, norm: str | None,
                 padding: int = 0, eps: float = 1e-5, matmul: bool = True):
        super().__init__()
        self.matmul = matmul
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size=kernel, stride=stride, padding=padding, bias=bias)
        self.norm_kind = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(num_groups=out_dim, num_channels=out_dim, affine=True, eps=eps)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(out_dim, elementwise_affine=True, eps=eps)
        self.activation = nn.GELU()

    def forward(self, x: Tensor, out_lens: Tensor | None = None,
                stats: tuple[Tensor, Tensor] | None = None) -> Tensor:  # [B, C_in, T] -> [B, C_out, T']
        """Group norm only: ``out_lens``: valid output frames per row, the norm's statistics then come from each
        row's own valid frames (:func:`_per_row_group_norm`); ``stats``: given ``(mean, var)`` per channel ``[C]``
        (:meth:`ConvFeatureExtractor.forward_long`). Neither: ``nn.GroupNorm`` over all ``T'`` frames."""
        x = conv1d_matmul(self.conv, x) if self.matmul else self.conv(x)
        if self.norm_kind == "group" and stats is not None:
            x = _group_norm_with(x, stats[0].view(1, -1, 1), stats[1].view(1, -1, 1), self.layer_norm)
        elif self.norm_kind == "group":
            x = self.layer_norm(x) if out_lens is None else _per_row_group_norm(x, out_lens, self.layer_norm)
        elif self.norm_kind == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return self.activation(x)


def _per_row_group_norm(x: Tensor, lens: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``GroupNorm(C, C)`` of ``x`` [B, C, T] with each row's mean and variance taken over its first ``lens[b]``
    frames only, so a row's valid frames equal those of the row alone. Frames past ``lens[b]`` get the same
    affine map (their values are never used by a valid output frame). Statistics: per row, a sum and a sum of
    squares over its valid frames (variance ``E[x^2] - mean^2``: conv 0 of a waveform has a mean far below its
    spread), then one affine pass over the batch, in place without autograd: less memory
    traffic than ``nn.GroupNorm`` itself (so it serves full-length batches too; they equal ``nn.GroupNorm``'s
    to float rounding, ~1e-6)."""
    frames = x.shape[-1]
    counts = [max(1, min(int(n), frames)) for n in lens.tolist()]
    means, variances = [], []
    for b, n in enumerate(counts):
        # reductions in x's dtype (float32 accumulation inside; under bf16 autocast the two sums are rounded to
        # bf16, 0.4% of each, about the resolution of the bf16 output; asking for float32 results takes a slow
        # path, 3x nn.GroupNorm). x is time-major in memory (conv1d_matmul): plain sums over time are fast there,
        # vector_norm / var_mean over a strided dim are 3-10x slower than squaring first.
        valid = x[b, :, :n]
        mean = valid.sum(-1).float() / n
        means.append(mean)
        sumsq = (valid * valid).sum(-1).float()
        variances.append((sumsq / n - mean.square()).clamp(min=0))
    return _group_norm_with(x, torch.stack(means).unsqueeze(-1), torch.stack(variances).unsqueeze(-1), norm)


def _group_norm_with(x: Tensor, mean: Tensor, var: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` in ``x``'s dtype (scale and shift computed in float32;
    ``mean``, ``var`` broadcast over ``x``); in place when no gradient is needed."""
    scale = torch.rsqrt(var.float() + norm.eps) * norm.weight.float().view(1, -1, 1)
    shift = norm.bias.float().view(1, -1, 1) - mean.float() * scale
    scale, shift = scale.to(x.dtype), shift.to(x.dtype)
    if x.requires_grad or torch.is_grad_enabled() and norm.weight.requires_grad:
        return torch.addcmul(shift, x, scale)
    return x.mul_(scale).add_(shift)


class ConvFeatureExtractor(nn.Module):
    """The HuBERT waveform CNN: ``conv_layers`` = [(dim, kernel, stride), ...], no padding.

    ``feat_extract_norm="group"``: GroupNorm(dim, dim) after the first conv only (Base; normalises every channel
    over time). By default its statistics span every frame of the padded batch, so a row's output depends on how
    much zero padding the batch gave it, exactly as in fairseq and transformers (and training, which crops each
    batch to one length, never pads). ``per_row_norm = True`` (set by :func:`set_per_row_norm`; every
    ``speechssl.upstream.Upstream`` does) takes them over each row's own valid frames instead, so every row equals
    its utterance run alone: batched inference without padding effects. The later convs are local and unpadded:
    a valid output frame only sees valid input frames. ``"layer"``: LayerNorm over channels after every conv
    (Large; padding-independent either way).
    """

    def __init__(self, config: HubertConfig):
        super().__init__()
        layers, in_dim = [], 1
        for i, (dim, kernel, stride) in enumerate(config.conv_layers):
            if config.feat_extract_norm == "layer":
                norm = "layer"
            else:
                norm = "group" if i == 0 else None
            layers.append(_ConvLayer(in_dim, dim, kernel, stride, bias=config.conv_bias, norm=norm,
                                     eps=config.layer_norm_eps))
            in_dim = dim
        self.conv_layers = nn.ModuleList(layers)
        for layer in self.conv_layers:  # fairseq ConvFeatureExtractionModel init
            nn.init.kaiming_normal_(layer.conv.weight)
            if layer.conv.bias is not None:
                nn.init.zeros_(layer.conv.bias)
        self.kernels_strides = [(k, s) for _, k, s in config.conv_layers]
        self.feature_grad_mult = config.feature_grad_mult
        self.output_dim = in_dim
        self.per_row_norm = False  # group norm statistics per row's valid frames (see the class docstring)

    def num_frames(self, num_samples: Tensor) -> Tensor:
        """Output frames for ``num_samples`` input samples: ``floor((L - kernel) / stride) + 1`` per layer, >= 0."""
        n = torch.as_tensor(num_samples).long()
        for kernel, stride in self.kernels_strides:
            n = (torch.div(n - kernel, stride, rounding_mode="floor") + 1).clamp(min=0)
        return n

    def _run(self, wavs: Tensor, wav_lens: Tensor) -> Tensor:
        x = wavs.unsqueeze(1)
        lens = wav_lens.to(wavs.device).long()
        for layer, (kernel, stride) in zip(self.conv_layers, self.kernels_strides):
            lens = (torch.div(lens - kernel, stride, rounding_mode="floor") + 1).clamp(min=0)
            x = layer(x, lens if self.per_row_norm and layer.norm_kind == "group" else None)
        return x.transpose(1, 2)

    @property
    def receptive_field(self) -> tuple[int, int]:
        """``(samples, stride)``: output frame ``t`` reads samples ``[t * stride, t * stride + samples)``."""
        field, stride = 1, 1
        for kernel, s in self.kernels_strides:
            field += (kernel - 1) * stride
            stride *= s
        return field, stride

    @torch.no_grad()
    def forward_long(self, wav: Tensor, window: int = 30 * 16000) -> Tensor:
        """``[S]`` -> ``[T, C]``: the frames of ``forward(wav[None])`` for one (long) waveform, computed about
        ``window`` samples at a time, so memory holds one window's activations instead of the whole utterance's
        (the Base CNN needs ~0.4 kB per sample at once). The convs are unpadded and local: output frames
        ``[t0, t1)`` are exactly those of samples ``[t0 * stride, (t1 - 1) * stride + field)``. The group norm
        takes the whole utterance's statistics (what ``forward`` takes for a lone row), from a first pass of
        conv 0 (float64 sums). Equal to ``forward`` to float rounding; no gradient."""
        field, stride = self.receptive_field
        total = int(self.num_frames(wav.shape[-1]))
        per = max(1, (window - field) // stride + 1)
        first = self.conv_layers[0]
        stats = self._group_norm_stats(wav, window) if first.norm_kind == "group" and total > 0 else None
        out = []
        for t0 in range(0, total, per):
            t1 = min(total, t0 + per)
            x = wav[t0 * stride: (t1 - 1) * stride + field].reshape(1, 1, -1)
            for i, layer in enumerate(self.conv_layers):
                x = layer(x, stats=stats if i == 0 else None)
            out.append(x[0].transpose(0, 1))
        if not out:
            return wav.new_zeros(0, self.output_dim)
        return torch.cat(out)

    def _group_norm_stats(self, wav: Tensor, window: int) -> tuple[Tensor, Tensor]:
        """Mean and (biased) variance per channel of conv 0's output over a whole waveform, ``window`` samples at
        a time."""
        kernel, stride = self.kernels_strides[0]
        conv = self.conv_layers[0].conv
        frames = (wav.shape[-1] - kernel) // stride + 1
        per = max(1, window // stride)
        s1 = torch.zeros(conv.out_channels, dtype=torch.float64, device=wav.device)
        s2 = torch.zeros_like(s1)
        for f0 in range(0, frames, per):
            f1 = min(frames, f0 + per)
            y = conv1d_matmul(conv, wav[f0 * stride: (f1 - 1) * stride + kernel].reshape(1, 1, -1))[0].double()
            s1 += y.sum(-1)
            s2 += y.square().sum(-1)
        mean = s1 / frames
        return mean, (s2 / frames - mean.square()).clamp(min=0)

    def forward(self, wavs: Tensor, wav_lens: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, S]`` float waveforms (zero beyond ``wav_lens``) -> ``([B, T, C], frame_lens [B])``."""
        if self.feature_grad_mult > 0:
            features = _scale_grad(self._run(wavs, wav_lens), self.feature_grad_mult)
        else:
            with torch.no_grad():
                features = self._run(wavs, wav_lens)
        return features, self.num_frames(wav_lens)


class FbankFeatureExtractor(nn.Module):
    """80-d Kaldi log-mel fbank (100 Hz, no gradient) -> per-utterance mean/variance normalisation -> Conv1d stack.

    The normalisation uses each utterance's own valid frames (``fbank(..., lengths, cmvn="meanvar")``), so a row's
    features never depend on the batch. Each conv layer is ``Conv1d(kernel, stride, padding=kernel // 2)`` + GELU;
    frames past a row's length are zeroed before every conv, so a row's valid output frames equal its unbatched
    output. Default (``hubert_tiny``): one layer (256, 3, 2): 100 Hz -> 50 Hz, ``ceil(T / 2)`` frames.
    """

    FRAME_LENGTH = 400  # 25 ms at 16 kHz
    FRAME_SHIFT = 160  # 10 ms

    def __init__(self, config: HubertConfig):
        super().__init__()
        layers, in_dim = [], config.num_mel_bins
        for dim, kernel, stride in config.conv_layers:
            # nn.Conv1d here (not conv1d_matmul): the matmul's different bf16 rounding alone moved the 5-minute
            # demo's iteration-1 best-layer PNMI from 1.11x to 1.096x the untrained model's (issue 16's 1.1x floor)
            layers.append(_ConvLayer(in_dim, dim, kernel, stride, bias=config.conv_bias, norm=None, padding=kernel // 2,
                                     matmul=False))
            in_dim = dim
        self.conv_layers = nn.ModuleList(layers)
        self.kernels_strides = [(k, s) for _, k, s in config.conv_layers]
        self.num_mel_bins = config.num_mel_bins
        self.feature_grad_mult = config.feature_grad_mult
        self.output_dim = in_dim

    def num_fbank_frames(self, num_samples: Tensor) -> Tensor:
        """Kaldi frames with snip_edges: ``1 + (S - 400) // 160`` for ``S >= 400``, else 0."""
        n = torch.as_tensor(num_samples).long()
        return torch.where(n < self.FRAME_LENGTH, torch.zeros_like(n),
                           1 + (n - self.FRAME_LENGTH).clamp(min=0) // self.FRAME_SHIFT)

    def num_frames(self, num_samples: Tensor) -> Tensor:
        """Output frames: fbank frames, then ``floor((T + 2 * (kernel // 2) - kernel) / stride) + 1`` per conv."""
        n = self.num_fbank_frames(num_samples)
        for kernel, stride in self.kernels_strides:
            n = torch.where(n > 0, torch.div(n + 2 * (kernel // 2) - kernel, stride, rounding_mode="floor") + 1, 0)
        return n

    def _run(self, feats: Tensor, lens: Tensor) -> Tensor:
        x = feats.transpose(1, 2)  # [B, 80, T]
        for (kernel, stride), layer in zip(self.kernels_strides, self.conv_layers):
            x = x * lengths_to_mask(lens, x.shape[-1]).unsqueeze(1).to(x.dtype)
            x = layer(x)
            lens = torch.where(lens > 0, torch.div(lens + 2 * (kernel // 2) - kernel, stride, rounding_mode="floor") + 1, 0)
        return x.transpose(1, 2)

    def fbank(self, wavs: Tensor, wav_lens: Tensor) -> tuple[Tensor, Tensor]:
        """The normalised fbank ``[B, T_fbank, num_mel_bins]`` the conv stack reads (no gradient, float32), and its
        frame lengths (BEST-RQ's targets come from it too)."""
        with torch.no_grad(), torch.autocast(wavs.device.type, enabled=False):
            feats = fbank(wavs.float(), num_mel_bins=self.num_mel_bins, lengths=wav_lens, cmvn="meanvar")
        return feats, self.num_fbank_frames(wav_lens).to(wavs.device)

    def encode(self, feats: Tensor, fbank_lens: Tensor) -> Tensor:
        """The conv stack over normalised fbank frames (``feature_grad_mult`` applied): ``[B, T, output_dim]``."""
        if self.feature_grad_mult > 0:
            return _scale_grad(self._run(feats, fbank_lens), self.feature_grad_mult)
        with torch.no_grad():
            return self._run(feats, fbank_lens)

    def forward(self, wavs: Tensor, wav_lens: Tensor) -> tuple[Tensor, Tensor]:
        feats, fbank_lens = self.fbank(wavs, wav_lens)
        return self.encode(feats, fbank_lens), self.num_frames(wav_lens)


def set_per_row_norm(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch every :class:`ConvFeatureExtractor` in ``model`` to per-row group norm statistics (``on``) or back
    to fairseq's / transformers' whole-batch ones; returns ``model``. The other frontends are per-row already."""
    for module in model.modules():
        if isinstance(module, ConvFeatureExtractor):
            module.per_row_norm = on
    return model


def build_frontend(config: HubertConfig) -> nn.Module:
    if config.frontend == "cnn":
        return ConvFeatureExtractor(config)
    return FbankFeatureExtractor(config)
