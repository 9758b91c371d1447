"""Utterance classification: mean-pool + linear over one or more label fields; accuracy = every field right.

===== ======================================================================================================
task  labels
===== ======================================================================================================
ks    ``utt2kw``: class name; ``-`` = not a keyword-spotting utterance
sid   ``utt2spk``
er    ``utt2emo`` (+ ``utt2session`` for the folds: each session held out in turn)
ic    ``utt2intent``: "action object location"; ``- - -`` = not an intent utterance
===== ======================================================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from speechssl.data.kaldi import DataDir, c_sorted
from speechssl.errors import UserError
from speechssl.superb import metrics
from speechssl.superb.heads import MeanPoolLinear
from speechssl.superb.tasks.base import Example, Fold, Split, SplitData, Task, _need

__all__ = ["Classification", "KeywordSpotting", "SpeakerIdentification", "EmotionRecognition", "IntentClassification"]


class Classification(Task):
    """Mean-pool + linear over one or more label fields; accuracy = every field right."""

    metric = "accuracy"
    label_file = ""
    fields = 1
    pools_first = True

    def __init__(self, cfg: SuperbConfig):
        super().__init__(cfg)
        self.classes: list[list[str]] = []

    def parse(self, value: str, path: Path, utt: str) -> tuple[str, ...] | None:
        """The label fields of one line (None: utterance not in the task)."""
        return (value,)

    def labels(self, dd: DataDir, path: Path, role: str) -> dict[str, tuple[str, ...]]:
        table = self.table(dd, path)
        out = {}
        for u, v in table.items():
            parsed = self.parse(v, path, u)
            if parsed is not None:
                out[u] = parsed
        return out

    def table(self, dd: DataDir, path: Path) -> dict[str, str]:
        return _need(dd, path, self.label_file, self.name)

    def fit(self, train: Split) -> None:
        self.classes = [sorted({ex.target[i] for ex in train.examples}) for i in range(self.fields)]

    def check(self, split: Split) -> None:
        known = [set(c) for c in self.classes]
        for ex in split.examples:
            for i, v in enumerate(ex.target):
                if v not in known[i]:
                    raise UserError(f"{split.path / self.label_file}: utterance {ex.utt}: label {v!r} never occurs in "
                                    f"the training split ({', '.join(self.classes[i][:8])}...); drop it or add "
                                    "training data for it")

    def state(self) -> dict[str, Any]:
        return {"classes": self.classes}

    def load_state(self, state: dict[str, Any]) -> None:
        self.classes = [list(c) for c in state["classes"]]

    def build_head(self, in_dim: int) -> nn.Module:
        return MeanPoolLinear(in_dim, [len(c) for c in self.classes], proj_dim=self.cfg.head.proj_dim)

    def _targets(self, targets: list[tuple[str, ...]], device: torch.device) -> list[Tensor]:
        index = [{c: i for i, c in enumerate(cl)} for cl in self.classes]
        return [torch.tensor([index[i][t[i]] for t in targets], device=device) for i in range(self.fields)]

    def loss(self, head, x, lens, targets):
        logits = head(x, lens)
        return sum(F.cross_entropy(lg, y) for lg, y in zip(logits, self._targets(targets, x.device)))

    def evaluate(self, head, batches, split):
        preds, labels = [], []
        for exs, x, lens in batches:
            logits = head(x, lens)
            idx = [lg.argmax(-1).tolist() for lg in logits]
            preds += [tuple(self.classes[i][idx[i][b]] for i in range(self.fields)) for b in range(len(exs))]
            labels += [ex.target for ex in exs]
        out = {"accuracy": metrics.accuracy(preds, labels)}
        if self.fields > 1:
            for i in range(self.fields):
                out[f"accuracy_{i}"] = metrics.accuracy([p[i] for p in preds], [t[i] for t in labels])
        return out


class KeywordSpotting(Classification):
    name, label_file = "ks", "utt2kw"

    def parse(self, value, path, utt):
        value = value.strip()
        return None if value == "-" else (value,)


class SpeakerIdentification(Classification):
    name, label_file = "sid", "utt2spk"

    def table(self, dd, path):
        return dd.utt2spk


class EmotionRecognition(Classification):
    """Folds: each of the first ``cfg.folds`` sessions (C-sorted ``utt2session`` values) held out in turn as test;
    dev = ``cfg.dev_frac`` of the other sessions' utterances (deterministic), train = the rest. The data dirs given
    (one dir, or train/dev/test together) are pooled."""

    name, label_file = "er", "utt2emo"
    split_names = ("all",)
    fold_key = "session"

    def folds(self, data: dict[str, SplitData]) -> list[Fold]:
        pooled: list[Example] = []
        sessions: dict[str, str] = {}
        for key, d in data.items():
            sess = _need(d.dd, d.path, "utt2session", "er folds: utterance -> session")
            for ex in self.make_split(key, d.path, d.dd, d.durations).examples:
                pooled.append(ex)
                sessions[ex.utt] = sess[ex.utt].strip()
        held_out = c_sorted(set(sessions.values()))
        first = next(iter(data.values()))
        if len(held_out) < 2:
            raise UserError(f"{first.path / 'utt2session'}: {len(held_out)} session(s); the folds need at least two")
        out = []
        for held in held_out[: self.cfg.folds]:
            rest = [e for e in pooled if sessions[e.utt] != held]
            dev_mask = np.random.default_rng(0).random(len(rest)) < self.cfg.dev_frac
            mk = lambda name, exs: Split(name, first.path, first.dd, exs)  # noqa: E731
            splits = {"train": mk("train", [e for e, m in zip(rest, dev_mask) if not m]),
                      "dev": mk("dev", [e for e, m in zip(rest, dev_mask) if m]),
                      "test": mk("test", [e for e in pooled if sessions[e.utt] == held])}
            out.append(Fold(held, splits, {name: "*" for name in splits}))
        return out


class IntentClassification(Classification):
    name, label_file, fields = "ic", "utt2intent", 3

    def parse(self, value, path, utt):
        parts = value.split()
        if parts and parts[0] == "-":
            return None
        if len(parts) != 3:
            raise UserError(f"{path / 'utt2intent'}: utterance {utt}: expected 'action object location' (3 fields, "
                            f"'none' where absent), got {value!r}")
        return tuple(parts)
