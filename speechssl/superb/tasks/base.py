"""The task interface of the SUPERB runner: a task says which utterances take part, their labels, the head, the loss,
the metric, and (through hooks, never ``if task ==`` branches in the runner) anything else it needs: extra run
options (ASV trials), its own folds (ER's held-out sessions), or scoring without training (QbE).

Classes (phones, characters, keywords, speakers, emotions, intent slots) are those of the training split, sorted;
a dev/test label the training split never had is an error naming the file and utterance. A task's state (its
vocabularies) is plain JSON, saved with every head checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from torch import Tensor, nn

from speechssl.data.kaldi import DataDir, c_sorted
from speechssl.errors import MissingInputError, UserError
from speechssl.superb.config import SuperbConfig

__all__ = ["Example", "Split", "Fold", "SplitData", "Task", "Batches"]

# (examples of the batch, featurizer output [B, T, D], frame lengths [B])
Batches = Iterable[tuple[list["Example"], Tensor, Tensor]]


@dataclass
class SplitData:
    """One data dir of a run, read once: its path, contents and per-utterance durations."""

    path: Path
    dd: DataDir
    durations: dict[str, float]


@dataclass
class Fold:
    """What one training + evaluation pass sees: its splits (train/dev/test) and the feature-source key of each
    split's data dir (``sources[split]`` names an entry of the run's per-data-dir sources, or ``"*"``: all of them
    together, ER's pooled sessions)."""

    name: str                        # "" for the usual single pass; ER: the held-out session
    splits: dict[str, "Split"]
    sources: dict[str, str] = field(default_factory=dict)


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
    trains = True                          # False: no head; the runner calls score() (QbE)
    split_names = ("train", "dev", "test")  # the data dirs the task reads (--data DIR/<name>, --<name> DIR)
    fold_key = "fold"                      # what results.json calls a fold's name (er: "session")

    def __init__(self, cfg: SuperbConfig):
        self.cfg = cfg
        self.frame_rate = 0.0   # the features' frames per second, set by the runner before make_split / fit

    # ---- run options and folds
    def configure(self, *, dev_trials: str | Path | None = None, test_trials: str | Path | None = None) -> None:
        """Task-specific run options (``speechssl superb --dev-trials/--test-trials``); a task that takes none
        refuses them."""
        given = [f"--{k.replace('_', '-')}" for k, v in (("dev_trials", dev_trials), ("test_trials", test_trials))
                 if v is not None]
        if given:
            raise UserError(f"{' '.join(given)}: only task asv takes trials files, not {self.name}")

    def folds(self, data: dict[str, SplitData]) -> list[Fold]:
        """The training + evaluation passes of a run over its data dirs (read once, keyed by split name): one pass
        over train/dev/test by default (ER: each session held out in turn, results averaged)."""
        splits = {name: self.make_split(name, d.path, d.dd, d.durations) for name, d in data.items()}
        return [Fold("", splits, {name: name for name in splits})]

    def score(self, sources: dict[str, Any], splits: dict[str, Split]) -> dict[str, Any]:
        """Tasks without training (``trains = False``): ``{"dev": metrics, "test": metrics, ...}`` from the frozen
        features (``sources[split name]``)."""
        raise NotImplementedError

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


