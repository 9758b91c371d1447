"""SUPERB speaker diarization (SD): frame-wise speaker activity of two-speaker mixtures, scored by DER.

Data: a Kaldi data dir whose utterances are the mixtures (Libri2Mix: ``speechssl.superb.corpora.libri2mix``;
mini_synth: ``egs/mini_synth/superb/local/make_mixtures.py``), plus ``rttm`` in the same dir: the reference
speaker turns, the RTTM file id being the utterance id (RTTM lines of other ids are ignored, so a subset of the
dir may keep the whole file; an utterance without any line is an error).

What SUPERB does (s3prl ``downstream/diarization``: ``model.py``, ``utils.py``, ``dataset.py``, ``config.yaml``,
``score.sh``), and what is the same here:

* head: ``nn.LSTM(upstream_dim, hidden_size=512, num_layers=1)``, unidirectional, then ``nn.Linear(hidden,
  num_speakers=2)`` per frame (:class:`SDHead`; no projector in s3prl: ``head.proj_dim`` 0);
* loss: permutation-invariant BCE (``pit_loss``, from EEND): per utterance the speaker order with the smallest
  sum over valid frames of the BCE averaged over speakers, summed over the batch and divided by the number of
  valid frames (:func:`pit_bce`);
* targets: frame ``rint(start * rate)`` to ``rint(end * rate)`` of each RTTM turn is 1 for its speaker, at the
  upstream's frame rate (s3prl: ``frame_shift`` = the upstream's stride, ``subsampling`` 1, ``label_delay`` 0;
  here ``self.frame_rate``, set by the runner). Speakers of a mixture take the head's outputs in sorted order;
  the number of outputs is the most speakers of a training mixture (Libri2Mix: 2, as s3prl's ``num_speakers``);
* DER: predictions -> sigmoid > 0.5 -> turns (frame ``i`` = ``[i, i+1) / rate`` s) scored against the reference
  RTTM in continuous time with collar 0 and overlapping speech scored (dscore ``score.py`` defaults, which
  ``score.sh`` uses), errors summed over recordings (:mod:`speechssl.superb.der`; checked against
  pyannote.metrics in the tests).

Differences: s3prl trains on chunks of 2,000 label frames (20 s at a 10 ms shift) and infers test recordings
chunk by chunk; here whole mixtures go through the head (Libri2Mix mixtures are at most ~35 s, mini_synth's ~5 s).
s3prl's ``score.sh`` also sweeps thresholds 0.3-0.7 and median filters 1/11 and reports the best test DER; here
threshold 0.5 and a fixed ``head.median_filter`` (seconds; default 0 = none), so no test-set tuning. Batches are seconds of audio
(``optim.max_duration``), not s3prl's 8 chunks x 4 accumulation.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.data.kaldi import DataDir
from speechssl.errors import MissingInputError, UserError
from speechssl.superb.config import SuperbConfig
from speechssl.superb.der import COMPONENTS, Turn, der_components, frames_to_turns, rates, read_rttm, turns_to_frames
from speechssl.superb.heads import _projector, length_mask
from speechssl.superb.tasks import Split, Task

__all__ = ["SDHead", "SpeakerDiarization", "pit_bce", "permutations"]


class SDHead(nn.Module):
    """``[B, T, D] -> [B, T, num_speakers]`` logits: optional projector, ``num_layers`` unidirectional LSTM layers
    of ``hidden`` units, a linear layer per frame (s3prl ``downstream/diarization/model.py``)."""

    def __init__(self, in_dim: int, num_speakers: int, *, proj_dim: int = 0, hidden: int = 512, num_layers: int = 1):
        super().__init__()
        self.proj, d = _projector(in_dim, proj_dim)
        self.lstm = nn.LSTM(d, hidden, num_layers=num_layers, batch_first=True) if num_layers > 0 else None
        self.out = nn.Linear(hidden if self.lstm is not None else d, num_speakers)

    def forward(self, x: Tensor, lens: Tensor) -> Tensor:
        h = self.proj(x)
        if self.lstm is not None:   # padding sits after each row's frames: a forward LSTM never reads it early
            h, _ = self.lstm(h)
        return self.out(h)


def permutations(num_speakers: int) -> Tensor:
    """``[P, S]`` every order of ``S`` speakers (``S!`` rows, identity first)."""
    return torch.tensor(list(itertools.permutations(range(num_speakers))), dtype=torch.long).reshape(-1, num_speakers)


def pit_bce(logits: Tensor, targets: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
    """Permutation-invariant BCE (s3prl ``pit_loss``): ``logits``, ``targets`` ``[B, T, S]``, ``lens`` ``[B]``
    -> (scalar loss, ``[B]`` index into :func:`permutations` of each utterance's best target order)."""
    perms = permutations(targets.shape[-1]).to(logits.device)
    mask = length_mask(lens.to(logits.device), logits.shape[1]).to(logits.dtype)
    per = []
    for p in perms:
        bce = F.binary_cross_entropy_with_logits(logits, targets[..., p], reduction="none").mean(-1)
        per.append((bce * mask).sum(1))
    best, idx = torch.stack(per, 1).min(1)
    return best.sum() / mask.sum().clamp(min=1), idx


def median_filter(active: np.ndarray, k: int) -> np.ndarray:
    """``[T, S]`` 0/1 activity, each column median-filtered over ``k`` (odd) frames with zeros past both ends
    (``scipy.signal.medfilt``, as s3prl's ``make_rttm.py``): on 0/1 values the median is the majority."""
    if k <= 1:
        return active
    a = np.asarray(active, dtype=np.float32).reshape(len(active), -1)
    window = np.ones(k, dtype=np.float32)
    votes = np.stack([np.convolve(a[:, s], window, mode="same") for s in range(a.shape[1])], 1)
    return votes > k // 2


class SpeakerDiarization(Task):
    name, metric, higher_is_better = "sd", "der", False
    collar = 0.0          # seconds each side of a reference boundary left out (SUPERB/dscore: 0)
    skip_overlap = False  # SUPERB scores overlapping speech
    threshold = 0.5       # speaker active where sigmoid(logit) > threshold

    def __init__(self, cfg: SuperbConfig):
        super().__init__(cfg)
        self.num_speakers = 0

    def labels(self, dd: DataDir, path: Path, role: str) -> dict[str, list[Turn]]:
        rttm_path = Path(path) / "rttm"
        if not rttm_path.is_file():
            raise MissingInputError(f"{rttm_path}: no such file; task sd needs the reference speaker turns of "
                                    "every utterance (RTTM, file id = utterance id)")
        rttm = read_rttm(rttm_path)
        missing = [u for u in dd.utt_ids() if u not in rttm]
        if missing:
            raise UserError(f"{rttm_path}: no SPEAKER line for utterance {missing[0]}"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; add its turns or "
                            "drop it from the data dir")
        return {u: rttm[u] for u in dd.utt_ids()}

    def fit(self, train: Split) -> None:
        self.num_speakers = max(len({t.speaker for t in ex.target}) for ex in train.examples)

    def check(self, split: Split) -> None:
        for ex in split.examples:
            n = len({t.speaker for t in ex.target})
            if n > self.num_speakers:
                raise UserError(f"{split.path / 'rttm'}: utterance {ex.utt} has {n} speakers; the head has "
                                f"{self.num_speakers} outputs (the most of a training mixture)")

    def state(self) -> dict[str, Any]:
        return {"num_speakers": self.num_speakers}

    def load_state(self, state: dict[str, Any]) -> None:
        self.num_speakers = int(state["num_speakers"])

    def build_head(self, in_dim: int) -> nn.Module:
        h = self.cfg.head
        return SDHead(in_dim, self.num_speakers, proj_dim=h.proj_dim, hidden=h.hidden, num_layers=h.num_layers)

    def _median_frames(self) -> int:
        """``head.median_filter`` seconds as an odd number of frames (1: no filter)."""
        k = int(round(self.cfg.head.median_filter * self._rate()))
        return max(1, k + 1 - k % 2)

    def _rate(self) -> float:
        if not self.frame_rate or self.frame_rate <= 0:
            raise RuntimeError("SpeakerDiarization.frame_rate is not set (the runner sets the features' rate)")
        return float(self.frame_rate)

    def targets(self, turns: list[Turn], num_frames: int) -> Tensor:
        """``[num_frames, num_speakers]`` 0/1 activity of one mixture's turns (speakers sorted)."""
        spk = sorted({t.speaker for t in turns})
        y = np.zeros((num_frames, self.num_speakers), dtype=np.float32)
        y[:, : len(spk)] = turns_to_frames(turns, spk, num_frames, self._rate())
        return torch.from_numpy(y)

    def loss(self, head: nn.Module, x: Tensor, lens: Tensor, targets: list[Any]) -> Tensor:
        logits = head(x, lens)
        y = torch.stack([self.targets(t, logits.shape[1]) for t in targets]).to(logits.device)
        return pit_bce(logits, y, lens)[0]

    def evaluate(self, head, batches, split):
        acc = dict.fromkeys(COMPONENTS, 0.0)
        rate = self._rate()
        for exs, x, lens in batches:
            active = (torch.sigmoid(head(x, lens)) > self.threshold).cpu().numpy()
            for b, ex in enumerate(exs):
                hyp = frames_to_turns(median_filter(active[b, : int(lens[b])], self._median_frames()), rate)
                for k, v in der_components(ex.target, hyp, collar=self.collar,
                                           skip_overlap=self.skip_overlap).items():
                    acc[k] += v
        out = rates(acc)
        out.pop("total")
        return out
