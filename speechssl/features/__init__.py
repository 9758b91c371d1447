"""Features room (floor 3): Kaldi-compatible MFCC / fbank in torch and the sharded feature store."""

from speechssl.features.store import FeatureReader, FeatureStoreError, FeatureWriter

__all__ = ["FeatureReader", "FeatureStoreError", "FeatureWriter"]
