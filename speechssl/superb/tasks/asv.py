"""Speaker verification (ASV): an x-vector head trained with AM-softmax on the training speakers; dev/test are
scored on trials files ("enroll_utt test_utt target|nontarget" per line) by the cosine of the embeddings; EER and
minDCF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.data.kaldi import DataDir, c_sorted
from speechssl.errors import MissingInputError, UserError
from speechssl.superb import metrics
from speechssl.superb.config import SuperbConfig
from speechssl.superb.heads import AMSoftmax, XVector
from speechssl.superb.tasks.base import Example, Split, Task

__all__ = ["read_trials", "make_trials", "SpeakerVerification"]


def read_trials(path: str | Path, dd: DataDir) -> list[tuple[str, str, bool]]:
    """``enroll test target|nontarget`` (or 1|0) lines; both utterances must be in ``dd``."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such trials file; write one with `speechssl superb trials --data DIR "
                                "--out FILE` or pass --dev-trials/--test-trials")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        f = line.split()
        if not f:
            continue
        if len(f) != 3 or f[2] not in ("target", "nontarget", "1", "0"):
            raise UserError(f"{path}:{n}: expected 'enroll_utt test_utt target|nontarget', got {line!r}")
        for u in f[:2]:
            if u not in dd.utt2spk:
                raise UserError(f"{path}:{n}: utterance {u} is not in the data dir it is scored on")
        out.append((f[0], f[1], f[2] in ("target", "1")))
    if not out:
        raise UserError(f"{path}: no trials")
    return out


def make_trials(dd: DataDir, *, per_utt: int = 2, seed: int = 0) -> list[tuple[str, str, bool]]:
    """For every utterance (enrolment), ``per_utt`` target trials (another utterance of its speaker) and
    ``per_utt`` non-target trials (an utterance of another speaker), drawn with ``seed``; deterministic."""
    rng = np.random.default_rng(seed)
    spk2utt = dd.spk2utt()
    utts = dd.utt_ids()
    if len(spk2utt) < 2:
        raise UserError("trials need at least two speakers")
    trials = []
    for u in utts:
        same = [v for v in spk2utt[dd.utt2spk[u]] if v != u]
        for v in rng.choice(same, size=min(per_utt, len(same)), replace=False) if same else []:
            trials.append((u, str(v), True))
        others = [v for v in utts if dd.utt2spk[v] != dd.utt2spk[u]]
        for v in rng.choice(others, size=min(per_utt, len(others)), replace=False):
            trials.append((u, str(v), False))
    return trials


class _ASVHead(nn.Module):
    def __init__(self, xvector: XVector, loss: AMSoftmax):
        super().__init__()
        self.xvector, self.amsoftmax = xvector, loss


class SpeakerVerification(Task):
    name, metric, higher_is_better = "asv", "eer", False

    def __init__(self, cfg: SuperbConfig):
        super().__init__(cfg)
        self.speakers: list[str] = []
        self.trials_paths: dict[str, Path] = {}

    def configure(self, *, dev_trials=None, test_trials=None):
        """``--dev-trials`` / ``--test-trials``: trials files other than DEV/trials and TEST/trials."""
        for name, p in (("dev", dev_trials), ("test", test_trials)):
            if p is not None:
                self.trials_paths[name] = Path(p)

    def make_split(self, name, path, dd, durations):
        if name == "train":
            return super().make_split(name, path, dd, durations)
        trials = read_trials(self.trials_paths.get(name, path / "trials"), dd)
        used = c_sorted({u for a, b, _ in trials for u in (a, b)})
        return Split(name, path, dd, [Example(u, float(durations[u]), None) for u in used], trials=trials,
                     skipped=len(dd) - len(used))

    def labels(self, dd, path, role):
        return dict(dd.utt2spk)

    def fit(self, train):
        self.speakers = sorted({ex.target for ex in train.examples})

    def state(self):
        return {"speakers": self.speakers}

    def load_state(self, state):
        self.speakers = list(state["speakers"])

    def build_head(self, in_dim):
        h = self.cfg.head
        xv = XVector(in_dim, proj_dim=h.proj_dim, tdnn=h.tdnn, emb_dim=h.emb_dim)
        return _ASVHead(xv, AMSoftmax(h.emb_dim, len(self.speakers), s=h.am_s, m=h.am_m))

    def loss(self, head, x, lens, targets):
        index = {s: i for i, s in enumerate(self.speakers)}
        y = torch.tensor([index[t] for t in targets], device=x.device)
        return head.amsoftmax(head.xvector(x, lens), y)

    def evaluate(self, head, batches, split):
        emb: dict[str, Tensor] = {}
        for exs, x, lens in batches:
            e = F.normalize(head.xvector(x, lens), dim=-1)
            for b, ex in enumerate(exs):
                emb[ex.utt] = e[b]
        assert split.trials is not None
        scores = [float(emb[a] @ emb[b]) for a, b, _ in split.trials]
        eer, min_dcf = metrics.eer_min_dcf(scores, [t for _, _, t in split.trials])
        return {"eer": eer, "min_dcf": min_dcf}
