"""Units room (floor 6): k-means pseudo-labels keyed by utterance id, label/audio checks, label quality, and
per-layer unit quality of a checkpoint (``units layers``, through ``speechssl.upstream``) and the layer the next
iteration's units come from (``units best-layer``)."""

from speechssl.units.alignments import AlignmentError, PhoneAlignment, read_alignments, read_ctm, read_textgrid
from speechssl.units.best_layer import LayerChoice, choose_layer, paper_layer
from speechssl.units.kmeans import (
    Assigner,
    FitOptions,
    KMeansModel,
    fit_kmeans,
    fit_sample,
    fit_store,
    label_store,
    label_with,
    merge_label_shards,
    sample_frames,
    sample_indices,
    StreamSampler,
)
from speechssl.units.layers import evaluate_layers
from speechssl.units.labels import (
    LabelError,
    LabelSet,
    check_label_length,
    check_labels_cover,
    check_same_utterances,
    expected_num_frames,
    label_stride,
    read_labels,
    write_labels,
)
from speechssl.units.quality import (
    PhoneUnitCounts,
    QualityReport,
    evaluate_labels,
    label_quality,
    quality_from_counts,
)

__all__ = [
    "AlignmentError", "PhoneAlignment", "read_alignments", "read_ctm", "read_textgrid",
    "LayerChoice", "choose_layer", "paper_layer",
    "Assigner", "FitOptions", "KMeansModel", "fit_kmeans", "fit_sample", "fit_store", "label_store", "label_with",
    "merge_label_shards",
    "sample_frames", "sample_indices", "StreamSampler", "evaluate_layers",
    "LabelError", "LabelSet", "check_label_length", "check_labels_cover", "check_same_utterances",
    "expected_num_frames", "label_stride", "read_labels", "write_labels",
    "PhoneUnitCounts", "QualityReport", "evaluate_labels", "label_quality", "quality_from_counts",
]
