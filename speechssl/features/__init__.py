"""Features room (floor 3): Kaldi-compatible MFCC / fbank in torch and the sharded feature store."""

from speechssl.features.kaldi import add_deltas, apply_cmvn, fbank, mfcc, num_frames
from speechssl.features.store import FeatureReader, FeatureStoreError, FeatureWriter

__all__ = [
    "FeatureReader",
    "FeatureStoreError",
    "FeatureWriter",
    "add_deltas",
    "apply_cmvn",
    "fbank",
    "mfcc",
    "num_frames",
]
