"""The seven SUPERB tasks on Kaldi-style data dirs: which utterances take part, their labels, the head, the loss
and the metric.

Label files (one line per utterance of the split; the data-dir reader already rejects an ``utt2*`` file that lacks
an utterance, naming file and utterance):

===== ======================================================================================================
task  labels
===== ======================================================================================================
pr    ``utt2phones`` ("utt p1 p2 ..."), else ``phones.ctm`` (``sil``/``sp``/``spn`` dropped); utterances
      without phones (silence clips) are left out
asr   ``text`` -> characters, ``|`` between words (or sentencepiece units); empty transcripts left out
ks    ``utt2kw``: class name; ``-`` = not a keyword-spotting utterance
sid   ``utt2spk``
asv   ``utt2spk`` of train; dev/test: a ``trials`` file, "enroll_utt test_utt target|nontarget" per line
er    ``utt2emo`` (+ ``utt2session`` for the folds)
ic    ``utt2intent``: "action object location"; ``- - -`` = not an intent utterance
===== ======================================================================================================

Classes (phones, characters, keywords, speakers, emotions, intent slots) are those of the training split, sorted;
a dev/test label the training split never had is an error naming the file and utterance. A task's state (its
vocabularies) is plain JSON, saved with every head checkpoint.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.data.kaldi import DataDir, c_sorted
from speechssl.errors import MissingInputError, UserError
from speechssl.superb import metrics
from speechssl.superb.config import SuperbConfig
from speechssl.superb.heads import AMSoftmax, BiLSTM, FrameLinear, MeanPoolLinear, XVector

__all__ = ["Example", "Split", "Task", "make_task", "read_trials", "make_trials", "SILENCE_PHONES"]

SILENCE_PHONES = frozenset({"sil", "SIL", "sp", "spn", "<eps>"})
# (examples of the batch, featurizer output [B, T, D], frame lengths [B])
Batches = Iterable[tuple[list["Example"], Tensor, Tensor]]


@dataclass
class Example:
    utt: str
    duration: float
    target: Any


@dataclass
class Split:
    name: str                     # train | dev | test (er: + fold)
    path: Path                    # data dir
    dd: DataDir
    examples: list[Example]
    trials: list[tuple[str, str, bool]] | None = None   # asv
    skipped: int = 0              # utterances of the dir not in the task (no keyword, empty transcript, ...)


def _need(dd: DataDir, path: Path, name: str, what: str) -> dict[str, str]:
    table = dd.extra.get(name)
    if table is None:
        raise MissingInputError(f"{path / name}: no such file; this task needs it ({what})")
    return table


class Task:
    """One SUPERB task. Subclasses set ``name``, ``metric``, ``higher_is_better`` and implement the hooks."""

    name = ""
    metric = ""
    higher_is_better = True
    # the head is linear up to a mean over time: with a linear featurizer it trains on per-utterance means
    # (superb.cache.PooledFeatures), the same model at a fraction of the cost
    pools_first = False

    def __init__(self, cfg: SuperbConfig):
        self.cfg = cfg

    # ---- labels
    def labels(self, dd: DataDir, path: Path, role: str) -> dict[str, Any]:
        """utt -> raw label of every utterance of the split that takes part in the task."""
        raise NotImplementedError

    def fit(self, train: Split) -> None:
        """Build the vocabularies from the training split."""

    def check(self, split: Split) -> None:
        """Dev/test labels must be known to the training split (error naming file and utterance)."""

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- model
    def build_head(self, in_dim: int) -> nn.Module:
        raise NotImplementedError

    def loss(self, head: nn.Module, x: Tensor, lens: Tensor, targets: list[Any]) -> Tensor:
        raise NotImplementedError

    def evaluate(self, head: nn.Module, batches: Batches, split: Split) -> dict[str, float]:
        """Metrics of ``split``; the main one under ``self.metric``."""
        raise NotImplementedError

    # ---- shared helpers
    def make_split(self, name: str, path: Path, dd: DataDir, durations: dict[str, float]) -> Split:
        labels = self.labels(dd, path, name)
        examples = [Example(u, float(durations[u]), labels[u]) for u in c_sorted(labels)]
        if not examples:
            raise UserError(f"{path}: no utterance of this data dir takes part in task {self.name}")
        return Split(name, path, dd, examples, skipped=len(dd) - len(examples))


# ----------------------------------------------------------------------------------------------------- CTC tasks
class _CTCTask(Task):
    higher_is_better = False

    def __init__(self, cfg: SuperbConfig):
        super().__init__(cfg)
        self.vocab: list[str] = []   # index 0 = blank

    def tokens(self, label: Any) -> list[str]:
        raise NotImplementedError

    def fit(self, train: Split) -> None:
        units = sorted({t for ex in train.examples for t in self.tokens(ex.target)})
        self.vocab = ["<blank>"] + units

    def state(self) -> dict[str, Any]:
        return {"vocab": self.vocab}

    def load_state(self, state: dict[str, Any]) -> None:
        self.vocab = list(state["vocab"])

    def loss(self, head: nn.Module, x: Tensor, lens: Tensor, targets: list[Any]) -> Tensor:
        index = {t: i for i, t in enumerate(self.vocab)}
        seqs = [[index[t] for t in self.tokens(y)] for y in targets]
        logits, out_lens = head(x, lens)
        lp = logits.log_softmax(-1).transpose(0, 1)   # [T, B, V]
        flat = torch.tensor([i for s in seqs for i in s], dtype=torch.long, device=lp.device)
        tlens = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=lp.device)
        return F.ctc_loss(lp, flat, out_lens.to(lp.device), tlens, blank=0, reduction="mean", zero_infinity=True)

    def decode(self, head: nn.Module, x: Tensor, lens: Tensor) -> list[list[str]]:
        logits, out_lens = head(x, lens)
        lp = logits.log_softmax(-1)
        return [[self.vocab[i] for i in metrics.ctc_greedy_decode(lp[b, : int(out_lens[b])], blank=0)]
                for b in range(lp.shape[0])]


class PhoneRecognition(_CTCTask):
    name, metric = "pr", "per"

    def labels(self, dd: DataDir, path: Path, role: str) -> dict[str, list[str]]:
        if "utt2phones" in dd.extra:
            raw = {u: v.split() for u, v in dd.extra["utt2phones"].items()}
        else:
            ctm = path / "phones.ctm"
            if not ctm.is_file():
                raise MissingInputError(f"{ctm}: no such file; task pr needs utt2phones or phones.ctm in {path}")
            from speechssl.units.alignments import read_alignments

            ali = read_alignments(ctm)
            raw = {}
            for u in dd.utt_ids():
                if u not in ali:
                    raise UserError(f"{ctm}: no phones for utterance {u} (every utterance of {path} needs an "
                                    "alignment; subset the data dir or add it)")
                raw[u] = ali[u].phones
        return {u: [p for p in ph if p not in SILENCE_PHONES] for u, ph in raw.items()
                if any(p not in SILENCE_PHONES for p in ph)}

    def tokens(self, label: list[str]) -> list[str]:
        return label

    def build_head(self, in_dim: int) -> nn.Module:
        return FrameLinear(in_dim, len(self.vocab), proj_dim=self.cfg.head.proj_dim)

    def evaluate(self, head, batches, split):
        refs, hyps = [], []
        for exs, x, lens in batches:
            hyps += self.decode(head, x, lens)
            refs += [ex.target for ex in exs]
        return {"per": metrics.per(refs, hyps)}


class SpeechRecognition(_CTCTask):
    name, metric = "asr", "wer"

    def __init__(self, cfg: SuperbConfig):
        super().__init__(cfg)
        self._spm = None
        self._spm_proto: bytes | None = None

    def labels(self, dd: DataDir, path: Path, role: str) -> dict[str, str]:
        if dd.text is None:
            raise MissingInputError(f"{path / 'text'}: no such file; task asr needs transcripts")
        return {u: " ".join(t.split()) for u, t in dd.text.items() if t.strip()}

    def tokens(self, label: str) -> list[str]:
        if self.cfg.head.units == "bpe":
            return self._sp().encode(label, out_type=str)
        return list(label.replace(" ", "|"))

    def fit(self, train: Split) -> None:
        if self.cfg.head.units == "bpe":
            import sentencepiece as spm

            model = io.BytesIO()
            spm.SentencePieceTrainer.train(sentence_iterator=iter([ex.target for ex in train.examples]),
                                           model_writer=model, vocab_size=self.cfg.head.bpe_vocab,
                                           model_type="unigram", character_coverage=1.0, bos_id=-1, eos_id=-1,
                                           hard_vocab_limit=False, minloglevel=2)
            self._spm_proto, self._spm = model.getvalue(), None
        super().fit(train)

    def _sp(self):
        if self._spm is None:
            import sentencepiece as spm

            self._spm = spm.SentencePieceProcessor(model_proto=self._spm_proto)
        return self._spm

    def state(self) -> dict[str, Any]:
        out = super().state()
        if self._spm_proto is not None:
            out["spm_model"] = base64.b64encode(self._spm_proto).decode()
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if "spm_model" in state:
            self._spm_proto, self._spm = base64.b64decode(state["spm_model"]), None

    def detok(self, toks: list[str]) -> str:
        if self.cfg.head.units == "bpe":
            return self._sp().decode_pieces(toks)
        return " ".join("".join(toks).replace("|", " ").split())

    def build_head(self, in_dim: int) -> nn.Module:
        h = self.cfg.head
        return BiLSTM(in_dim, len(self.vocab), proj_dim=h.proj_dim, hidden=h.hidden, num_layers=h.num_layers,
                      dropout=h.dropout, downsample=h.downsample)

    def evaluate(self, head, batches, split):
        refs, hyps = [], []
        for exs, x, lens in batches:
            hyps += [self.detok(t) for t in self.decode(head, x, lens)]
            refs += [ex.target for ex in exs]
        return {"wer": metrics.wer(refs, hyps), "cer": metrics.cer(refs, hyps)}


# ----------------------------------------------------------------------------------- utterance classification
class _Classification(Task):
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


class KeywordSpotting(_Classification):
    name, label_file = "ks", "utt2kw"

    def parse(self, value, path, utt):
        value = value.strip()
        return None if value == "-" else (value,)


class SpeakerIdentification(_Classification):
    name, label_file = "sid", "utt2spk"

    def table(self, dd, path):
        return dd.utt2spk


class EmotionRecognition(_Classification):
    name, label_file = "er", "utt2emo"


class IntentClassification(_Classification):
    name, label_file, fields = "ic", "utt2intent", 3

    def parse(self, value, path, utt):
        parts = value.split()
        if parts and parts[0] == "-":
            return None
        if len(parts) != 3:
            raise UserError(f"{path / 'utt2intent'}: utterance {utt}: expected 'action object location' (3 fields, "
                            f"'none' where absent), got {value!r}")
        return tuple(parts)


# --------------------------------------------------------------------------------------------------- ASV
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


_TASKS: dict[str, Callable[[SuperbConfig], Task]] = {
    "pr": PhoneRecognition, "asr": SpeechRecognition, "ks": KeywordSpotting, "sid": SpeakerIdentification,
    "asv": SpeakerVerification, "er": EmotionRecognition, "ic": IntentClassification,
}


def make_task(cfg: SuperbConfig) -> Task:
    return _TASKS[cfg.task](cfg)


def er_folds(dd: DataDir, path: Path, num_folds: int) -> list[str]:
    """The sessions held out in turn (the first ``num_folds`` C-sorted ``utt2session`` values)."""
    table = _need(dd, path, "utt2session", "er folds: utterance -> session")
    sessions = c_sorted(set(v.strip() for v in table.values()))
    if len(sessions) < 2:
        raise UserError(f"{path / 'utt2session'}: {len(sessions)} session(s); the folds need at least two")
    return sessions[:num_folds]
