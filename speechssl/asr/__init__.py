"""ASR decoding (floor 8: above ``train`` and ``superb``, below ``cli``): decode and score CTC outputs.

    from speechssl.asr import BeamDecoder, build_arpa_from_text
    build_arpa_from_text("data/train/text", "exp/lm/3gram.arpa", order=3)
    dec = BeamDecoder(vocab, lm="exp/lm/3gram.arpa")         # vocab[0] is the CTC blank, "|" between words
    tokens = dec.decode(log_probs)                            # [T, V] log-probabilities of one utterance

Rooms: ``lm`` (word n-gram LMs as ARPA files: interpolated modified Kneser-Ney builder, Kaldi ``text`` reader,
ARPA reader), ``beam`` (CTC beam search with or without an LM on flashlight-text, an optional dependency imported
on first use). Word and character error rates come from ``speechssl.superb.metrics``; nothing here imports
``cli``.
"""

from speechssl.asr.beam import BeamDecoder, Hypothesis, MissingDependencyError
from speechssl.asr.lm import AsrError, NgramModel, build_arpa, build_arpa_from_text, kneser_ney, read_arpa, \
    read_kaldi_text, write_arpa

__all__ = ["BeamDecoder", "Hypothesis", "MissingDependencyError", "AsrError", "NgramModel", "build_arpa",
           "build_arpa_from_text", "kneser_ney", "read_arpa", "read_kaldi_text", "write_arpa"]
