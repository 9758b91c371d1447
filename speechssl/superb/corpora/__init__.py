"""Real-corpus preparation for the SUPERB tasks: one module per corpus, each reading the corpus in its released
layout and writing Kaldi data dirs plus the task's label files under ``OUT/`` (atomically, with ``prepare.json``).

=================================  ==========  ======================================================================
module                             tasks       writes
=================================  ==========  ======================================================================
`librispeech`                      PR, ASR     ``{train,dev,test}/``: text, utt2phones (``--lexicon``)
`speech_commands`                  KS          ``{train,dev,test,test_official}/``: utt2kw (12 classes), segments
`voxceleb1`                        SID, ASV    ``sid/{train,dev,test}/``, ``asv/{train,test}/``, ``asv/test/trials``
`iemocap`                          ER          ``all/``: utt2emo (4 classes), utt2session (folds)
`fluent_speech_commands`           IC          ``{train,dev,test}/``: text, utt2intent ("action object location")
`quesst14`                         QbE         ``{dev,test}/``: queries + documents, utt2role, qbe_truth, utt2lang
`libri2mix`                        SD          ``{train,dev,test}/``: two-speaker mixtures (``wav/``), rttm
`snips`                            SF          ``{train,dev,test}/``: text, utt2slots (transcript with slot tags)
=================================  ==========  ======================================================================

Run one as ``speechssl superb prepare <module> --corpus DIR --out DIR`` (what
``egs/superb/<corpus>/prepare.sh`` does). Nothing here downloads: egs/superb/README.md has the download commands.
"""
