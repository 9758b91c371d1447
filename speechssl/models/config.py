"""HuBERT model configuration: one dataclass, one builder per published size.

Field names follow transformers' ``HubertConfig`` where one exists (``hidden_size``, ``feat_extract_norm``,
``do_stable_layer_norm``, ...), so exporting to transformers is a copy. The pretraining-head fields follow
fairseq's ``HubertConfig`` (``final_dim``, ``logit_temp``, ``mask_prob``, ``pred_masked_weight``, ...).

Sizes (fairseq ``examples/hubert/config/pretrain/*.yaml``, HuBERT paper):

==========  ======  ======  =====  =====  =========  =============  ======  ============
builder     layers  dim     FFN    heads  final_dim  extractor      LN      dropouts/fgm
==========  ======  ======  =====  =====  =========  =============  ======  ============
base        12      768     3072   12     256        group norm     post    0.1 / 0.1
large       24      1024    4096   16     768        layer norm     pre     0.0 / 1.0
xlarge      48      1280    5120   16     1024       layer norm     pre     0.0 / 1.0
tiny (CPU)  6       256     1024   4      256        fbank + conv   post    0.1 / 1.0
==========  ======  ======  =====  =====  =========  =============  ======  ============

Encoder families (``model_type``, read from transformers directories by :mod:`speechssl.models.hf`):
``"hubert"`` (what the HuBERT objective pretrains; BEST-RQ pretrains it too), ``"wav2vec2"`` (the wav2vec 2.0
objective's; the same encoder, its feature projection always has the LayerNorm) and ``"wavlm"`` (gated relative
position bias in every attention layer, :mod:`speechssl.models.wavlm`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from speechssl.errors import UserError

__all__ = [
    "HubertConfig",
    "MODEL_TYPES",
    "OBJECTIVES",
    "PAPER_CONV_LAYERS",
    "hubert_base",
    "hubert_large",
    "hubert_xlarge",
    "hubert_tiny",
]

MODEL_TYPES = ("hubert", "wav2vec2", "wavlm")
OBJECTIVES = ("hubert", "wav2vec2", "bestrq")

# wav2vec 2.0 / HuBERT waveform CNN: 7 layers, receptive field 400 samples (25 ms), stride 320 (20 ms).
PAPER_CONV_LAYERS: list[tuple[int, int, int]] = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


@dataclass
class HubertConfig:
    """Everything needed to rebuild a HuBERT encoder (and its pretraining head) from plain JSON.

    Frontends:

    * ``"cnn"``: the waveform CNN; ``conv_layers`` lists ``(dim, kernel, stride)`` per layer, no padding.
      ``feat_extract_norm="group"`` puts ``GroupNorm(dim, dim)`` on the first layer only (Base);
      ``"layer"`` puts a LayerNorm over channels after every conv (Large).
    * ``"fbank"``: 80-d Kaldi log-mel fbank at 100 Hz (no gradient), per-utterance mean and variance
      normalisation over the utterance's valid frames, then ``conv_layers`` as Conv1d layers over time with
      padding ``kernel // 2`` + GELU (default one layer, stride 2: 100 Hz -> 50 Hz).

    Feature penalty (``feature_penalty_weight``, fairseq's ``features_pen``: weight x mean square of the frontend
    output) belongs to the waveform CNN, whose output scale is otherwise unbounded. With the fbank frontend it is
    refused: the LayerNorm of the feature projection makes the loss blind to the conv output's scale, so the
    penalty's steady gradient is all Adam sees in the conv weights, and it turns them toward the *minor*
    directions of the normalised fbank input (on mini_synth, 100 updates took the share of the conv's weight
    energy in the 20 principal directions that hold 78% of the input variance from 8.6% to 1.1%, and the variance
    it passes from 1.0x to 0.23x of a random conv's). The LayerNorm scales that residue back up, the encoder sees
    mostly noise (layer-0 PNMI 0.16 vs 0.31 untrained) and its upper layers collapse to an effective rank of ~2,
    predicting the unigram distribution of the units.

    Encoder family (``model_type``): ``"hubert"`` (default), ``"wav2vec2"`` or ``"wavlm"``. All three share the
    frontend, feature projection, positional conv and layer layouts; ``feat_proj_layer_norm=False`` (transformers'
    HuBERT option: no LayerNorm before the feature projection) exists for ``"hubert"`` only; WavLM adds a gated
    relative position bias (``num_buckets`` buckets up to ``max_bucket_distance`` frames, layer 0's embedding
    shared by all layers). WavLM loads as an encoder (upstream) only.

    Pretraining objective (``objective``, :mod:`speechssl.models.pretrain`): ``"hubert"`` (k-means units; the head
    fields ``final_dim`` ... ``pred_nomask_weight``), ``"wav2vec2"`` (contrastive against a Gumbel product quantizer:
    ``num_codevector_groups`` ... ``feat_quantizer_dropout``, transformers' ``Wav2Vec2Config`` names and fairseq's
    Base values; ``model_type`` "wav2vec2") or ``"bestrq"`` (a frozen random-projection quantizer of stacked fbank:
    ``num_classes`` are its codebook sizes, ``bestrq_*``, ``quantizer_seed``). Masking (``mask_*``) is shared.
    """

    # frontend
    frontend: str = "cnn"
    conv_layers: list[tuple[int, int, int]] = field(default_factory=lambda: list(PAPER_CONV_LAYERS))
    feat_extract_norm: str = "group"
    conv_bias: bool = False
    feature_grad_mult: float = 0.1
    normalize_waveform: bool = False  # per-utterance zero mean / unit variance of the waveform (Large: true)
    num_mel_bins: int = 80  # fbank frontend only
    # encoder
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    do_stable_layer_norm: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.1
    layerdrop: float = 0.05
    # encoder family
    model_type: str = "hubert"  # "hubert" | "wav2vec2" | "wavlm"
    feat_proj_layer_norm: bool = True  # LayerNorm before the feature projection (False: transformers' HuBERT option)
    num_buckets: int = 320  # WavLM relative position buckets (half per direction)
    max_bucket_distance: int = 800  # WavLM: distance (frames) of the last logarithmic bucket
    # pretraining head
    final_dim: int = 256
    num_classes: list[int] = field(default_factory=lambda: [100])
    untie_final_proj: bool = True  # one final_proj chunk per label set (fairseq pretrain yamls)
    logit_temp: float = 0.1
    mask_prob: float = 0.8
    mask_length: int = 10
    mask_min_masks: int = 2
    pred_masked_weight: float = 1.0
    pred_nomask_weight: float = 0.0
    # fairseq's L2 penalty on the waveform CNN's output ("cnn" frontend only; must be 0 with "fbank", see below)
    feature_penalty_weight: float = 10.0
    # pretraining objective (models/pretrain.py): "hubert" (masked prediction of k-means units, the head above),
    # "wav2vec2" (contrastive against a Gumbel product quantizer, models/wav2vec2.py) or "bestrq" (masked prediction
    # of a frozen random-projection quantizer's codes, models/bestrq.py). mask_prob / mask_length are shared.
    objective: str = "hubert"
    # wav2vec 2.0 (transformers' Wav2Vec2Config names; fairseq wav2vec2_base_librispeech values)
    num_codevector_groups: int = 2  # G (fairseq latent_groups)
    num_codevectors_per_group: int = 320  # V (fairseq latent_vars)
    codevector_dim: int = 256  # G codevectors of codevector_dim / G concatenated (fairseq latent_dim 0 -> final_dim)
    proj_codevector_dim: int = 256  # project_q / project_hid output (fairseq final_dim)
    num_negatives: int = 100  # K distractors per masked frame
    contrastive_logits_temperature: float = 0.1  # fairseq logit_temp
    diversity_loss_weight: float = 0.1  # fairseq loss_weights[0] (prob_perplexity)
    gumbel_temperature: list[float] = field(default_factory=lambda: [2.0, 0.5, 0.999995])  # start, end, decay/update
    feat_quantizer_dropout: float = 0.0  # dropout on the quantizer's input (fairseq dropout_features: 0.1 in Base)
    # BEST-RQ: num_classes lists the codebook sizes (one random codebook, projection and softmax head each)
    bestrq_codebook_dim: int = 16
    bestrq_mask_noise_std: float = 0.1  # masked input frames are filled with N(0, std^2) noise (no mask embedding)
    quantizer_seed: int = 0  # seeds BEST-RQ's frozen projection and codebooks (saved in the checkpoint too)

    def __post_init__(self) -> None:
        self.conv_layers = [tuple(int(v) for v in layer) for layer in self.conv_layers]
        self.num_classes = [int(k) for k in self.num_classes]
        problems = []
        if self.frontend not in ("cnn", "fbank"):
            problems.append(f"frontend must be 'cnn' or 'fbank', got {self.frontend!r}")
        if self.feat_extract_norm not in ("group", "layer"):
            problems.append(f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
        if not self.conv_layers or any(len(layer) != 3 or min(layer) < 1 for layer in self.conv_layers):
            problems.append(f"conv_layers must be a non-empty list of positive (dim, kernel, stride), got {self.conv_layers}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_conv_pos_embedding_groups "
                f"{self.num_conv_pos_embedding_groups}"
            )
        if not self.num_classes or min(self.num_classes) < 1:
            problems.append(f"num_classes must list at least one positive codebook size, got {self.num_classes}")
        if not 0.0 <= self.mask_prob <= 1.0 or self.mask_length < 1:
            problems.append(f"need 0 <= mask_prob <= 1 and mask_length >= 1, got {self.mask_prob}, {self.mask_length}")
        if self.feature_grad_mult < 0:
            problems.append(f"feature_grad_mult must be >= 0, got {self.feature_grad_mult}")
        if self.frontend == "fbank" and self.feature_penalty_weight != 0:
            problems.append(
                f"feature_penalty_weight={self.feature_penalty_weight:g} with the fbank frontend: the penalty is "
                "fairseq's regulariser of the waveform CNN; on normalised fbank it turns the first conv toward the "
                "input's low-variance directions (the LayerNorm after it hides the shrinking), so the encoder sees "
                "mostly noise and collapses; set model.feature_penalty_weight=0"
            )
        if self.model_type not in MODEL_TYPES:
            problems.append(f"model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r}")
        if not self.feat_proj_layer_norm and self.model_type != "hubert":
            problems.append(f"feat_proj_layer_norm=False exists for model_type 'hubert' only, got {self.model_type!r}")
        if self.num_buckets < 4 or self.max_bucket_distance <= self.num_buckets // 4:
            problems.append(f"need num_buckets >= 4 and max_bucket_distance > num_buckets // 4 (WavLM buckets), "
                            f"got num_buckets={self.num_buckets}, max_bucket_distance={self.max_bucket_distance}")
        self.gumbel_temperature = [float(v) for v in self.gumbel_temperature]
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        elif self.objective == "wav2vec2":
            if self.model_type != "wav2vec2":
                problems.append(f"objective 'wav2vec2' needs model_type 'wav2vec2' (its encoder, exported as "
                                f"transformers' Wav2Vec2ForPreTraining), got {self.model_type!r}")
            if self.codevector_dim % self.num_codevector_groups:
                problems.append(f"codevector_dim {self.codevector_dim} is not divisible by num_codevector_groups "
                                f"{self.num_codevector_groups}")
            if min(self.num_codevector_groups, self.num_codevectors_per_group, self.num_negatives) < 1:
                problems.append("num_codevector_groups, num_codevectors_per_group and num_negatives must be >= 1")
            start, end, decay = (self.gumbel_temperature + [0.0] * 3)[:3]
            if len(self.gumbel_temperature) != 3 or not (start >= end > 0 and 0 < decay <= 1):
                problems.append(f"gumbel_temperature must be [start, end, decay] with start >= end > 0 and "
                                f"0 < decay <= 1, got {self.gumbel_temperature}")
        elif self.objective == "bestrq":
            if self.model_type == "wavlm":
                problems.append("objective 'bestrq' pretrains model_type 'hubert' or 'wav2vec2', got 'wavlm'")
            if self.downsample_rate % 160:
                problems.append(f"objective 'bestrq' stacks 10 ms fbank frames into model frames: the frame step "
                                f"({self.downsample_rate} samples) must be a multiple of 160")
            if self.bestrq_codebook_dim < 1 or self.bestrq_mask_noise_std < 0:
                problems.append("need bestrq_codebook_dim >= 1 and bestrq_mask_noise_std >= 0")
        if problems:
            raise UserError("invalid HubertConfig: " + "; ".join(problems))

    # -- derived sizes --------------------------------------------------------------------------------
    @property
    def downsample_rate(self) -> int:
        """Waveform samples per encoder frame (320 for the paper CNN and for fbank + one stride-2 conv)."""
        strides = math.prod(stride for _, _, stride in self.conv_layers)
        return strides * (160 if self.frontend == "fbank" else 1)

    @property
    def frame_rate(self) -> float:
        """Encoder frames per second at 16 kHz."""
        return 16000.0 / self.downsample_rate

    # -- plain JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["conv_layers"] = [list(layer) for layer in self.conv_layers]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HubertConfig":
        """Inverse of :meth:`to_dict`; an unknown key is an error that names it."""
        return dataclass_from_dict(cls, data)


def dataclass_from_dict(cls, data: dict[str, Any]):
    """``cls(**data)`` for a config dataclass; an unknown key is a :class:`UserError` naming it and the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(names)}")
    return cls(**data)


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> HubertConfig:
    return HubertConfig.from_dict({**defaults, **overrides})


def hubert_base(**overrides: Any) -> HubertConfig:
    """HuBERT Base (~95M): 12 x 768, FFN 3072, 12 heads, group-norm CNN, post-LN, final_dim 256."""
    return _build(
        dict(
            frontend="cnn", feat_extract_norm="group", conv_bias=False, feature_grad_mult=0.1,
            normalize_waveform=False, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, do_stable_layer_norm=False, hidden_dropout=0.1, attention_dropout=0.1,
            activation_dropout=0.0, feat_proj_dropout=0.1, layerdrop=0.05, final_dim=256,
        ),
        overrides,
    )


def hubert_large(**overrides: Any) -> HubertConfig:
    """HuBERT Large (~316M): 24 x 1024, FFN 4096, 16 heads, layer-norm CNN, pre-LN, normalised input, final_dim 768."""
    return _build(
        dict(
            frontend="cnn", feat_extract_norm="layer", conv_bias=False, feature_grad_mult=1.0,
            normalize_waveform=True, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, do_stable_layer_norm=True, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, final_dim=768,
        ),
        overrides,
    )


def hubert_xlarge(**overrides: Any) -> HubertConfig:
    """HuBERT X-Large (~1B): 48 x 1280, FFN 5120, 16 heads, as Large otherwise, final_dim 1024."""
    return hubert_large(
        **{"hidden_size": 1280, "num_hidden_layers": 48, "intermediate_size": 5120, "final_dim": 1024, **overrides}
    )


def hubert_tiny(**overrides: Any) -> HubertConfig:
    """A CPU-sized HuBERT (~5M): fbank + one stride-2 conv (256), 6 x 256, FFN 1024, 4 heads, post-LN.

    Positional conv kernel 32 with 8 groups (the paper's 128 spans 2.56 s at 50 Hz; 32 spans 0.64 s).
    No feature penalty (``feature_penalty_weight=0``): it is a waveform-CNN regulariser and collapses the fbank
    frontend (see :class:`HubertConfig`).
    """
    return _build(
        dict(
            frontend="fbank", conv_layers=[(256, 3, 2)], feat_extract_norm="group", conv_bias=True,
            feature_grad_mult=1.0, normalize_waveform=False, hidden_size=256, num_hidden_layers=6,
            num_attention_heads=4, intermediate_size=1024, do_stable_layer_norm=False,
            num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8, hidden_dropout=0.1,
            attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.1, layerdrop=0.0, final_dim=256,
            feature_penalty_weight=0.0,
        ),
        overrides,
    )
