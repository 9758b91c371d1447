"""Which data dirs a SUPERB run reads, read once: ``--data DIR`` means DIR/<split> for each split the task reads
(``Task.split_names``: train/dev/test; QbE: dev/test), ``--train/--dev/--test`` override each. ER reads one data
dir with ``utt2session`` (``--data DIR`` itself when it holds ``wav.scp``), or train/dev/test pooled.

Each data dir is parsed and its durations looked up once (:class:`~speechssl.superb.tasks.SplitData`) and passed
down to the task (labels, folds) and to the feature cache (fingerprint, extraction).
"""

from __future__ import annotations

from pathlib import Path

from speechssl.data.durations import durations_of
from speechssl.data.kaldi import read_data_dir
from speechssl.errors import MissingInputError, UserError
from speechssl.superb.tasks import SplitData, Task

__all__ = ["SPLITS", "resolve_splits", "read_splits"]

SPLITS = ("train", "dev", "test")


def resolve_splits(task: Task, data: str | Path | None = None, train: str | Path | None = None,
                   dev: str | Path | None = None, test: str | Path | None = None) -> dict[str, Path]:
    """Split name -> data dir, checked to exist (one-line errors naming the split and the options)."""
    given = {"train": train, "dev": dev, "test": test}
    pooled = task.split_names == ("all",)
    if pooled and data is not None and (Path(data) / "wav.scp").is_file():
        return {"all": Path(data)}
    names = SPLITS if pooled else task.split_names
    out: dict[str, Path] = {}
    for name in names:
        if given[name] is not None:
            out[name] = Path(given[name])  # type: ignore[arg-type]
        elif data is not None:
            out[name] = Path(data) / name
    for name, p in out.items():
        if not p.is_dir():
            raise MissingInputError(f"{p}: no such data dir ({name} split); give --data DIR with "
                                    f"{'/'.join(names)} or --{' --'.join(names)}")
    missing = [n for n in names if n not in out]
    if pooled and not out:
        raise UserError(f"task {task.name}: give --data DIR (one data dir with utt2session, or DIR/train+dev+test)")
    if missing and not pooled:
        raise UserError(f"no {'/'.join(missing)} split: give --data DIR (with {'/'.join(names)}) or "
                        f"--{missing[0]} DIR")
    return out


def read_splits(dirs: dict[str, Path]) -> dict[str, SplitData]:
    """Every data dir parsed (validated) and its utterance durations looked up, once."""
    out = {}
    for name, path in dirs.items():
        dd = read_data_dir(path)
        out[name] = SplitData(path, dd, durations_of(dd))
    return out
