"""Upstream feature extraction: a checkpoint in, every layer's hidden states out (floor 5).

``load(path)`` -> :class:`Upstream`, an ``nn.Module`` in eval mode whose ``forward(wavs, wavs_len)`` returns
``(hidden_states, lens)``: one ``[B, T, D]`` tensor per layer (the input of every transformer layer plus the
encoder output, s3prl's convention: 13 for Base) and the valid frames per row. Dropout and LayerDrop are off.

:func:`load` reads speechssl checkpoints, local transformers HuBERT / wav2vec 2.0 / WavLM directories, and (with
``trust_pickle=True``) fairseq and s3prl pickle checkpoints.

``random_init(path, seed=0)`` (or ``load("random:PATH")``) is the untrained baseline every quality table carries:
a :class:`~speechssl.models.hubert.HubertModel` of the checkpoint's config, freshly initialised under
``torch.manual_seed(seed)`` (the global RNG is left as it was), no weights loaded.

Batch independence: a row of a zero-padded batch gives the hidden states of its utterance run alone (to float
rounding, <= 1e-4). The transformer masks padded frames; the fbank and layer-norm frontends are per-row; the
group-norm waveform CNN (Base) takes its statistics over each row's own valid frames here
(:func:`speechssl.models.frontend.set_per_row_norm`; fairseq and transformers let padding into them).

Callers go through :class:`Upstream` (``num_frames``, ``framing``, ``frame_rate``, ``hidden_sizes``, ``device``),
never its ``.model``. :func:`layers_extractor` / :func:`layer_extractor` give one utterance's hidden states as
numpy arrays (``units layers``, ``kmeans label_with``). Layers of a whole data dir go into feature stores through
:mod:`speechssl.upstream.extract` (``speechssl extract``: batched, sharded, resumable, optionally chunked), with
the header :func:`layer_feature_meta`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from speechssl.audio import SAMPLE_RATE
from speechssl.errors import MissingInputError, UserError
from speechssl.models.checkpoint import checkpoint_dir, load_model, read_config, read_json
from speechssl.models.frontend import ConvFeatureExtractor, lengths_to_mask, set_per_row_norm
from speechssl.models.hubert import HubertModel

__all__ = ["Upstream", "load", "random_init", "checkpoint_sha1", "layer_extractor", "layers_extractor",
           "layer_feature_meta", "parse_layers", "RANDOM_PREFIX"]

RANDOM_PREFIX = "random:"  # load("random:CKPT") == random_init("CKPT")


def checkpoint_sha1(path: str | Path) -> str:
    """SHA-1 of a checkpoint's weights: names the exact weights features came from.

    A directory's ``model.safetensors`` (speechssl or transformers; a transformers directory without one: its
    ``pytorch_model.bin``), or a pickle checkpoint file itself (any file is hashed as it is: whether it is a
    checkpoint is the loader's to say); ``random:CKPT``: ``"random:"`` + the SHA-1 of CKPT's ``config.json`` (seed
    0: the config fixes the weights). A directory without weights, or a path that does not exist, is a
    :class:`~speechssl.errors.MissingInputError` (an ``OSError`` too)."""
    if str(path).startswith(RANDOM_PREFIX):
        config = Path(str(path)[len(RANDOM_PREFIX):]) / "config.json"
        if not config.is_file():
            raise MissingInputError(f"{config}: no such file (random:CKPT needs CKPT's config.json)")
        return RANDOM_PREFIX + hashlib.sha1(config.read_bytes()).hexdigest()
    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if found is None:
            raise MissingInputError(f"{path}: no model.safetensors or pytorch_model.bin (not a checkpoint "
                                    "directory, or its weights were not copied)")
        path = found
    elif not path.is_file():
        raise MissingInputError(f"{path}: no such checkpoint")
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Upstream(nn.Module):
    """A frozen encoder mapping a batch of 16 kHz waveforms to every layer's hidden states; each row's equal to
    its utterance's alone (group norm statistics per row, padded frames masked)."""

    def __init__(self, model: HubertModel, source: str = ""):
        super().__init__()
        self.model = set_per_row_norm(model.eval())
        self.source = source
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def num_layers(self) -> int:
        """Number of hidden-state tensors returned (transformer layers + 1)."""
        return self.model.num_layers + 1

    @property
    def hidden_sizes(self) -> list[int]:
        return self.model.hidden_sizes

    @property
    def downsample_rate(self) -> int:
        return self.model.downsample_rate

    @property
    def frame_rate(self) -> float:
        return self.model.frame_rate

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_frames(self, num_samples: int) -> int:
        """Frames of every hidden state for a waveform of ``num_samples`` samples (exact)."""
        return int(self.model.num_frames(int(num_samples)))

    @property
    def framing(self) -> dict[str, Any] | None:
        """Label framing of the model's frames (see :mod:`speechssl.units.labels`): ``conv`` (kernel, stride) for
        the waveform CNN; None for the fbank frontend (its padded convs are within a frame of
        ``floor(S * rate / 16000)``, the framing-less default)."""
        config = self.model.config
        if getattr(config, "frontend", "cnn") == "cnn":
            return {"type": "conv", "layers": [[int(k), int(s)] for _, k, s in config.conv_layers]}
        return None

    def train(self, mode: bool = True) -> "Upstream":
        # Frozen: dropout and LayerDrop stay off whatever the caller's mode.
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, wavs: Sequence[Tensor] | Tensor, wavs_len: Tensor | None = None,
                num_layers: int | None = None) -> tuple[list[Tensor], Tensor]:
        """``wavs``: a list of 1-D waveforms, or a zero-padded ``[B, S]`` batch with ``wavs_len`` (samples per row).
        ``num_layers``: run only the first ``num_layers`` transformer layers (hidden states ``0..num_layers``, equal
        to those of a full run). Row ``b``'s first ``lens[b]`` frames do not depend on the other rows."""
        if isinstance(wavs, (list, tuple)):
            if wavs_len is not None:
                raise ValueError("wavs_len is given by the list itself; pass a padded tensor to use wavs_len")
            wavs_len = torch.tensor([w.shape[-1] for w in wavs], dtype=torch.long)
            wavs = nn.utils.rnn.pad_sequence([w.reshape(-1).float() for w in wavs], batch_first=True)
        device = self.device
        wavs = wavs.to(device)
        wavs_len = (wavs_len if wavs_len is not None else torch.full((wavs.shape[0],), wavs.shape[1])).to(device)
        hidden, lens = self.model(wavs, wavs_len, num_layers=num_layers)
        return hidden, lens


    @torch.no_grad()
    def frontend(self, wav: Tensor, window_seconds: float = 30.0) -> Tensor:
        """``[S]`` -> ``[T, hidden_size]``: one utterance's projected frontend features (the encoder's input),
        over the whole utterance as :meth:`forward` computes them, with the waveform CNN run
        ``window_seconds`` at a time (:meth:`~speechssl.models.frontend.ConvFeatureExtractor.forward_long`: memory
        of one window). With :meth:`encode`, the two halves of :meth:`forward` (chunked inference)."""
        model = self.model
        wav = wav.reshape(-1).float().to(self.device)
        if isinstance(model.feature_extractor, ConvFeatureExtractor):
            if model.config.normalize_waveform:  # as HubertModel.extract_features, over the whole utterance
                wav = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-5)
            features = model.feature_extractor.forward_long(wav, int(window_seconds * SAMPLE_RATE))
        else:
            features = model.extract_features(wav[None])[0][0]
        return model.feature_projection(features[None])[0]

    @torch.no_grad()
    def encode(self, x: Tensor, frame_lens: Tensor | None = None, num_layers: int | None = None) -> list[Tensor]:
        """Hidden states (as :meth:`forward`'s) of encoder inputs ``x`` ``[B, T, hidden_size]`` (from
        :meth:`frontend`; ``frame_lens``: valid frames per row, None = all)."""
        valid = None if frame_lens is None else lengths_to_mask(frame_lens.to(x.device), x.shape[1])
        return self.model.encoder(x, valid, num_layers=num_layers)


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")  # fairseq / s3prl checkpoints: torch.save pickles


def load(path: str | Path, *, trust_pickle: bool = False, device: str | torch.device = "cpu") -> Upstream:
    """Any checkpoint a speech researcher has on disk, as an :class:`Upstream`.

    * a speechssl checkpoint directory (``config.json`` with ``"format": "speechssl-hubert"`` + ``model.safetensors``);
    * a local transformers directory of ``HubertModel``, ``Wav2Vec2Model`` or ``WavLMModel`` (``config.json`` with
      its ``model_type`` + ``model.safetensors``, or ``pytorch_model.bin`` read with ``weights_only=True``), built
      from our own modules (no transformers import): :func:`speechssl.models.hf.load_hf_dir`;
    * a fairseq checkpoint or an s3prl "converted" checkpoint (a ``torch.save`` pickle file): only with
      ``trust_pickle=True``, since unpickling can run arbitrary code (:func:`speechssl.models.fairseq.load_pickle`);
    * ``"random:CKPT"``: :func:`random_init` of ``CKPT`` with seed 0, the untrained model of that config.
    """
    if str(path).startswith(RANDOM_PREFIX):
        return random_init(str(path)[len(RANDOM_PREFIX):], device=device)
    path = checkpoint_dir(path)  # a checkpoint's model.safetensors or config.json: name its directory
    if path.is_file():
        if not trust_pickle:
            raise UserError(f"{path}: a pickle checkpoint (fairseq / s3prl); unpickling can run arbitrary code, so it "
                            "is refused by default. If you trust its source: load(..., trust_pickle=True) "
                            "(command line: --trust-pickle)")
        from speechssl.models.fairseq import load_pickle

        model = load_pickle(path)
    elif not path.is_dir():
        raise MissingInputError(f"{path}: no such checkpoint (a speechssl or transformers directory, or with "
                                "--trust-pickle a fairseq / s3prl .pt file)")
    elif not (path / "config.json").is_file():
        raise MissingInputError(f"{path}: no config.json (expected a checkpoint directory)")
    elif _is_speechssl_dir(path):
        model = load_model(path, pretrain_head=False)
    else:
        from speechssl.models.hf import load_hf_dir

        model = load_hf_dir(path)
    return Upstream(model, source=str(path)).to(device)


def _is_speechssl_dir(path: Path) -> bool:
    """True for a directory written by ``models.checkpoint.save_model``; False for anything else with a config.json
    (a transformers directory, judged by :func:`speechssl.models.hf.load_hf_dir`)."""
    return read_json(checkpoint_dir(path) / "config.json").get("format") == "speechssl-hubert"


def random_init(path: str | Path, *, seed: int = 0, device: str | torch.device = "cpu") -> Upstream:
    """An untrained :class:`Upstream` of checkpoint ``path``'s config: the random-init baseline.

    ``path``: a speechssl or transformers checkpoint directory; only ``config.json`` is read (the weights need not
    exist). The model is built on the CPU under
    ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so the same ``seed`` gives the same weights on
    every call and device, and the caller's global RNG state is untouched. ``source`` is ``"random:<path>"``.
    """
    if _is_speechssl_dir(Path(path)):
        config, _ = read_config(path)
    else:
        from speechssl.models.hf import read_hf_config

        config = read_hf_config(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HubertModel(config)
    return Upstream(model, source=f"{RANDOM_PREFIX}{path}").to(device)


def parse_layers(spec: str | Sequence[int] | None, num_layers: int, source: str = "") -> list[int]:
    """``all`` / None -> every hidden state 0..num_layers-1; ``"0,3,6"`` or a list -> those (sorted, unique).
    Anything else, or a layer outside 0..num_layers-1: a one-line UserError naming ``source``."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        try:
            layers = [int(p) for p in spec.split(",") if p.strip()]
        except ValueError:
            raise UserError(f"--layers must be 'all' or comma-separated integers, got {spec!r}") from None
    else:
        layers = [int(p) for p in spec]
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad or not layers:
        raise UserError(f"--layers {spec!r}: {source or 'the checkpoint'} has hidden states 0..{num_layers - 1}")
    return sorted(set(layers))


def layers_extractor(upstream: Upstream, layers: Sequence[int], *, dtype=np.float16,
                     max_seconds: float = 60.0) -> Callable[[np.ndarray], dict[int, np.ndarray]]:
    """``fn(wav) -> {layer: [T, D]}``: hidden states of ``layers`` (0 = encoder input, ``num_layers - 1`` = output)
    of one 16 kHz waveform, as ``dtype`` numpy arrays, from one forward that runs only the layers needed.

    A waveform longer than ``max_seconds`` is an error (attention memory grows with its square): segment it first.
    """
    layers = [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < upstream.num_layers]
    if bad or not layers:
        raise UserError(f"layer(s) {bad or layers} out of range: {upstream.source} has hidden states "
                         f"0..{upstream.num_layers - 1}")
    top = max(layers)
    device = upstream.device

    def fn(wav: np.ndarray) -> dict[int, np.ndarray]:
        if wav.shape[0] > max_seconds * SAMPLE_RATE:
            raise UserError(f"utterance of {wav.shape[0] / SAMPLE_RATE:.1f} s is longer than {max_seconds} s; "
                             "segment it first")
        x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)).unsqueeze(0).to(device)
        hidden, lens = upstream(x, torch.tensor([x.shape[1]]), num_layers=top)
        t = int(lens[0])
        return {layer: hidden[layer][0, :t].float().cpu().numpy().astype(dtype) for layer in layers}

    return fn


def layer_extractor(upstream: Upstream, layer: int, *, dtype=np.float16,
                    max_seconds: float = 60.0) -> Callable[[np.ndarray], np.ndarray]:
    """``fn(wav) -> [T, D]``: hidden states of ``layer`` (:func:`layers_extractor` of one layer).

    Feeds ``kmeans label_with``: iteration 2 labels come from a model layer without the features room importing
    models.
    """
    extract = layers_extractor(upstream, [layer], dtype=dtype, max_seconds=max_seconds)
    return lambda wav: extract(wav)[layer]


def layer_feature_meta(upstream: Upstream, layer: int, ckpt_sha1: str, dtype: str = "float16") -> dict[str, Any]:
    """Feature-store header of hidden layer ``layer`` (what ``speechssl extract`` records, and what ``units layers``
    evaluates as): kind ``hubert_l<L>``, model frame rate, framing, checkpoint SHA-1."""
    meta: dict[str, Any] = {
        "kind": f"hubert_l{layer}",
        "dim": int(upstream.hidden_sizes[layer]),
        "frame_rate": float(upstream.frame_rate),
        "dtype": dtype,
        "source": {"checkpoint_sha1": ckpt_sha1, "layer": int(layer)},
    }
    if upstream.framing is not None:
        meta["framing"] = upstream.framing
    return meta
