"""What ``--upstream`` names: a checkpoint (anything :func:`speechssl.upstream.load` reads), ``random:CKPT`` (the
untrained model of CKPT's config), or a spectral baseline ``fbank`` / ``mfcc`` behind the same interface.

Every upstream here offers what the SUPERB runner uses of :class:`speechssl.upstream.Upstream`: ``num_layers``,
``hidden_sizes``, ``frame_rate``, ``source``, ``device``, ``num_frames(num_samples)`` and
``forward(wavs, wavs_len=None, num_layers=None) -> (hidden_states: list[[B, T, D]], lens [B])``.

Spectral upstreams have one "layer": 80-d log-mel fbank or 39-d MFCC (13 + deltas + delta-deltas), both from
:mod:`speechssl.features.kaldi` at 100 Hz with per-utterance mean and variance normalisation (for MFCC on the
static cepstra before the deltas, as ``apply-cmvn | add-deltas``), SUPERB's FBANK baseline. Note what that means
for utterance-level heads (SID, KS, IC, ER): their linear projector commutes with mean pooling, so the pooled
vector of a mean-normalised feature is the same for every utterance and the head can only learn the class prior
(SUPERB's FBANK SID accuracy is ~0). ``fbank:nocmvn`` / ``mfcc:nocmvn`` skip the normalisation: the informative
spectral baseline for those tasks.

:func:`upstream_fingerprint` names the exact numbers an upstream produces (weights SHA-1, or the spectral
options): the feature cache is keyed by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from speechssl.errors import MissingInputError
from speechssl.features.dump import feature_meta
from speechssl.features.kaldi import fbank, mfcc, num_frames

__all__ = ["SPECTRAL", "SpectralUpstream", "ResolvedUpstream", "resolve_upstream", "load_upstream",
           "upstream_fingerprint", "upstream_label"]

SPECTRAL = ("fbank", "mfcc", "fbank:nocmvn", "mfcc:nocmvn")
RANDOM_PREFIX = "random:"
_CMVN = "meanvar"


class SpectralUpstream(nn.Module):
    """fbank (80-d) or MFCC (39-d) at 100 Hz, per-utterance CMVN (``:nocmvn``: none), as a one-layer upstream."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in SPECTRAL:
            raise ValueError(f"spectral upstream kind must be one of {SPECTRAL}, got {kind!r}")
        self.kind, _, variant = kind.partition(":")
        self.cmvn: str | bool = False if variant == "nocmvn" else _CMVN
        self.source = kind
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # carries .device

    num_layers = 1
    frame_rate = 100.0
    downsample_rate = 160
    framing = {"type": "window", "frame_length": 400, "frame_shift": 160, "snip_edges": True}

    @property
    def hidden_sizes(self) -> list[int]:
        return [80 if self.kind == "fbank" else 39]

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def num_frames(self, num_samples: int) -> int:
        return num_frames(int(num_samples))

    @torch.no_grad()
    def forward(self, wavs: Sequence[Tensor] | Tensor, wavs_len: Tensor | None = None,
                num_layers: int | None = None) -> tuple[list[Tensor], Tensor]:
        if isinstance(wavs, (list, tuple)):
            wavs_len = torch.tensor([w.shape[-1] for w in wavs], dtype=torch.long)
            wavs = nn.utils.rnn.pad_sequence([w.reshape(-1).float() for w in wavs], batch_first=True)
        wavs = wavs.to(self.device).float()
        if wavs_len is None:
            wavs_len = torch.full((wavs.shape[0],), wavs.shape[1], dtype=torch.long)
        wavs_len = wavs_len.to(self.device)
        fn = fbank if self.kind == "fbank" else mfcc
        feats = fn(wavs, lengths=wavs_len, cmvn=self.cmvn)
        lens = torch.tensor([num_frames(int(n)) for n in wavs_len], dtype=torch.long, device=self.device)
        return [feats], lens


@dataclass
class ResolvedUpstream:
    """An ``--upstream`` resolved once for a run: its spec, table label, fingerprint (the weights' SHA-1 or the
    spectral options'), the loaded module and the layers the featurizer reads."""

    spec: str
    label: str
    fingerprint: dict[str, Any]
    module: nn.Module
    layers: list[int]

    @property
    def sha1(self) -> str:
        return self.fingerprint["sha1"]

    @property
    def frame_rate(self) -> float:
        return float(self.module.frame_rate)


def resolve_upstream(spec: str, layers: str | Sequence[int] = "all", *,
                     device: str | torch.device = "cpu") -> ResolvedUpstream:
    """Load ``spec`` (:func:`load_upstream`), fingerprint it and resolve the layer selection, once."""
    from speechssl.upstream import parse_layers

    fp = upstream_fingerprint(spec)
    module = load_upstream(spec, device=device)
    return ResolvedUpstream(spec, upstream_label(spec), fp, module,
                            parse_layers(layers, module.num_layers, module.source))


def load_upstream(spec: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """``fbank`` | ``mfcc`` | ``random:CKPT`` | a checkpoint path, as an upstream module (frozen, eval)."""
    if spec in SPECTRAL:
        return SpectralUpstream(spec).to(device).eval()
    from speechssl.upstream import load

    return load(spec, device=device)


def upstream_fingerprint(spec: str) -> dict[str, Any]:
    """``{"upstream": spec, "sha1": ...}``: what determines the upstream's numbers.

    ``fbank``/``mfcc``: SHA-1 of their feature options (+ CMVN); ``random:CKPT``: SHA-1 of CKPT's ``config.json``
    (the init seed is fixed at 0); a checkpoint: :func:`speechssl.upstream.checkpoint_sha1` of its weights."""
    if spec in SPECTRAL:
        kind, _, variant = spec.partition(":")
        opts = feature_meta(kind, False if variant == "nocmvn" else _CMVN)
        return {"upstream": spec, "sha1": _sha1(json.dumps(opts, sort_keys=True).encode())}
    if spec.startswith(RANDOM_PREFIX):
        cfg = Path(spec[len(RANDOM_PREFIX):]) / "config.json"
        if not cfg.is_file():
            raise MissingInputError(f"{cfg}: no such file (random:CKPT needs CKPT's config.json)")
        return {"upstream": spec, "sha1": _sha1(b"random-init seed 0\n" + cfg.read_bytes())}
    from speechssl.upstream import checkpoint_sha1

    path = Path(spec)
    if not path.exists():
        raise MissingInputError(f"{path}: no such checkpoint (an upstream is fbank, mfcc, random:CKPT or a "
                                "checkpoint directory)")
    return {"upstream": spec, "sha1": checkpoint_sha1(path)}


def upstream_label(spec: str) -> str:
    """A short name for tables: ``fbank``, ``random:hubert_iter1``, ``hubert_iter2`` (the checkpoint's directory,
    with its parent when the directory is called ``best`` or ``step-N``)."""
    if spec in SPECTRAL:
        return spec
    prefix = ""
    if spec.startswith(RANDOM_PREFIX):
        prefix, spec = RANDOM_PREFIX, spec[len(RANDOM_PREFIX):]
    p = Path(spec.rstrip("/"))
    name = p.name
    if name == "best" or name.startswith("step-"):
        name = f"{p.parent.name}/{name}" if name != "best" else p.parent.name
    return prefix + name


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()
