"""The ten SUPERB tasks on Kaldi-style data dirs: which utterances take part, their labels, the head, the loss and
the metric (:class:`~speechssl.superb.tasks.base.Task`; one module per family).

===== ============================= ==================================================================================
task  module                        labels
===== ============================= ==================================================================================
pr    tasks.ctc                     ``utt2phones``, else ``phones.ctm`` (silence dropped)
asr   tasks.ctc                     ``text``
ks    tasks.classify                ``utt2kw`` (``-`` = not in the task)
sid   tasks.classify                ``utt2spk``
asv   tasks.asv                     ``utt2spk`` of train; dev/test: a ``trials`` file
er    tasks.classify                ``utt2emo`` + ``utt2session`` (folds)
ic    tasks.classify                ``utt2intent`` ("action object location"; ``- - -`` = not in the task)
qbe   superb.qbe                    queries and documents (``utt2role``) with the term occurrences; no training
sd    superb.diarization            ``rttm`` of each mixture
sf    superb.slots                  ``utt2slots``: the transcript with slot tags
===== ============================= ==================================================================================
"""

from __future__ import annotations

import importlib
from typing import Callable

from speechssl.superb.config import SuperbConfig
from speechssl.superb.tasks.asv import SpeakerVerification, make_trials, read_trials
from speechssl.superb.tasks.base import Batches, Example, Fold, Split, SplitData, Task
from speechssl.superb.tasks.classify import (Classification, EmotionRecognition, IntentClassification, KeywordSpotting,
                                             SpeakerIdentification)
from speechssl.superb.tasks.ctc import SILENCE_PHONES, CTCTask, PhoneRecognition, SpeechRecognition

__all__ = ["Example", "Split", "SplitData", "Fold", "Task", "Batches", "make_task", "read_trials", "make_trials",
           "SILENCE_PHONES", "CTCTask", "PhoneRecognition", "SpeechRecognition", "Classification", "KeywordSpotting",
           "SpeakerIdentification", "EmotionRecognition", "IntentClassification", "SpeakerVerification"]

_TASKS: dict[str, Callable[[SuperbConfig], Task] | str] = {
    "pr": PhoneRecognition, "asr": SpeechRecognition, "ks": KeywordSpotting, "sid": SpeakerIdentification,
    "asv": SpeakerVerification, "er": EmotionRecognition, "ic": IntentClassification,
    # modules that build on these classes (imported when asked for)
    "qbe": "speechssl.superb.qbe:QueryByExample", "sd": "speechssl.superb.diarization:SpeakerDiarization",
    "sf": "speechssl.superb.slots:SlotFilling",
}


def make_task(cfg: SuperbConfig) -> Task:
    cls = _TASKS[cfg.task]
    if isinstance(cls, str):
        module, _, name = cls.partition(":")
        cls = getattr(importlib.import_module(module), name)
    return cls(cfg)
