"""SUPERB downstream evaluation (floor 7): frozen upstream, learned layer weights, cached features, task heads
and their metrics.

    from speechssl.superb import run_superb, results_table
    run_superb("pr", "exp/hubert_iter2/best", "exp/superb/iter2/pr", data="data")
    print(results_table(["exp/superb/*/*/results.json"]))

Rooms: ``upstreams`` (checkpoint / random:CKPT / fbank / mfcc behind one interface), ``featurizer`` (weighted sum,
hierarchical conv), ``cache`` (per-layer float16 feature stores, or the upstream every step), ``tasks`` (labels,
heads, losses, metrics per task), ``heads``, ``config`` (SUPERB defaults), ``runner`` (training, lr sweep, resume,
results, table), ``metrics`` (PER, WER, accuracy, EER/minDCF, CTC greedy decoding).
"""

from speechssl.superb.config import TASKS, SuperbConfig, default_config, load_superb_config
from speechssl.superb.featurizer import HierarchicalConv, WeightedSum, build_featurizer, conv_depth
from speechssl.superb.runner import results_table, run_superb
from speechssl.superb.upstreams import SPECTRAL, SpectralUpstream, load_upstream

__all__ = ["TASKS", "SuperbConfig", "default_config", "load_superb_config", "WeightedSum", "HierarchicalConv",
           "build_featurizer", "conv_depth", "run_superb", "results_table", "SPECTRAL", "SpectralUpstream",
           "load_upstream"]
