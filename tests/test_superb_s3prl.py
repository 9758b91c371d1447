"""SUPERB heads against s3prl's downstream modules: the same weights and inputs give the same outputs and losses.

The reference is s3prl 0.4.18 (tools/install.sh installs it with ``--no-deps`` for the dev extra): imported plainly,
so a missing s3prl fails these tests instead of skipping them. s3prl's downstream experts import torchaudio (and
the CTC one editdistance) at module level for their datasets and metrics; those names, absent here, are stubbed
while the expert module is imported (:func:`_s3prl`) and removed again, and the stubs are never called: only the
experts' ``__init__`` (their heads) and ``forward`` (projection, head, loss, decoding) run.

The yaml files that pick the heads are not in the s3prl wheel; their values (s3prl master) are written out here:

* PR, ``downstream/ctc/libriphone.yaml``: ``project_dim: 256``, ``select: FrameLevel`` (no hidden layer),
  ``zero_infinity: True``, text ``mode: word`` (phones), Adam lr 1e-2;
* SID, ``downstream/voxceleb1/config.yaml``: ``projector_dim: 256``, ``select: UtteranceLevel``,
  ``pooling: MeanPooling``, Adam lr 1e-4;
* ASV, ``downstream/sv_voxceleb1/configs/amsoftmax.yaml``: ``input_dim: 512`` (the connector), ``XVector`` with
  ``agg_dim: 1500``, ``agg_module: SP``, ``utter_module: UtteranceExtractor``, ``AMSoftmaxLoss`` s 30, m 0.4,
  AdamW lr 1e-4.

Every comparison runs in float64, so the tolerances (1e-9 relative) leave no room for a different formula; float32
is only summation-order noise on top.

Where our heads deliberately differ from s3prl's (each test's docstring says how), the test sets our side to
s3prl's choice and checks that the outputs then match, and that s3prl's choice does change them.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s3prl.downstream.sv_voxceleb1 import model as s3prl_sv
from s3prl.upstream.interfaces import Featurizer as S3prlFeaturizer

from speechssl.superb.config import load_superb_config
from speechssl.superb.featurizer import WeightedSum
from speechssl.superb.heads import XVector
from speechssl.superb.tasks import make_task

TOL = dict(rtol=1e-9, atol=1e-9)
RATE = 320   # samples per frame of the fake upstream (HuBERT's 20 ms)


def _unavailable(name: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{name} is a stub of tests/test_superb_s3prl.py: s3prl's datasets are not used here")
    return fail


def _stub_attr(module: str, attr: str):
    if attr.startswith("__"):   # the import system's questions (__path__, __spec__, ...): a plain module
        raise AttributeError(attr)
    return _unavailable(f"{module}.{attr}")


def _s3prl(module: str) -> types.ModuleType:
    """Import an s3prl module whose file imports torchaudio / editdistance (absent here) at module level: stubs
    stand in for those names during the import only."""
    added = []
    for name in ("torchaudio", "torchaudio.sox_effects", "editdistance"):
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__getattr__ = lambda attr, _n=name: _stub_attr(_n, attr)  # PEP 562
            sys.modules[name] = stub
            added.append(name)
    try:
        return importlib.import_module(module)
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _inputs(dim: int, lens: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ``[B, T, D]`` float64 features (zeros past each length, as the feature cache returns them) + lens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lens), max(lens), dim, generator=g, dtype=torch.float64)
    lens_t = torch.tensor(lens)
    return x * (torch.arange(max(lens))[None, :] < lens_t[:, None])[..., None], lens_t


def _randomize(module: nn.Module, seed: int) -> None:
    """Every parameter drawn anew (biases non-zero, so a dropped bias or swapped weight shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(max(1, p.shape[-1])))


def _copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in params]


# ------------------------------------------------------------------------------------------------ featurizer
class _FakeUpstream(nn.Module):
    """What s3prl's Featurizer asks of an upstream: ``hidden_states`` (a list of ``[B, T, D]``) and the frame
    rate (``get_downsample_rates``)."""

    def __init__(self, num_layers: int, dim: int):
        super().__init__()
        self.num_layers, self.dim = num_layers, dim

    def forward(self, wavs):
        T = max(len(w) for w in wavs) // RATE
        return {"hidden_states": [torch.randn(len(wavs), T, self.dim) for _ in range(self.num_layers)]}

    def get_downsample_rates(self, key: str) -> int:
        return RATE


def _s3prl_featurizer(ours: WeightedSum) -> S3prlFeaturizer:
    theirs = S3prlFeaturizer(_FakeUpstream(ours.num_layers, ours.dim), upstream_device="cpu",
                             normalize=ours.layer_norm).double()
    assert theirs.layer_num == ours.num_layers and theirs.output_dim == ours.dim
    torch.testing.assert_close(theirs.weights, torch.zeros(ours.num_layers, dtype=torch.float64))  # same start
    with torch.no_grad():
        theirs.weights.copy_(ours.weights)
    return theirs


def _featurize(theirs: S3prlFeaturizer, layers: torch.Tensor, lens: torch.Tensor) -> list[torch.Tensor]:
    """s3prl's way: the upstream's hidden states of a padded batch -> one ``[T_i, D]`` tensor per utterance."""
    wavs = [torch.zeros(int(n) * RATE) for n in lens]
    return theirs(wavs, {"hidden_states": list(layers)})


@pytest.mark.parametrize("layer_norm", [False, True])
def test_weighted_sum_equals_s3prl_featurizer(layer_norm):
    """s3prl ``upstream/interfaces.py`` ``Featurizer`` (softmax over the layer weights, s3prl's ``normalize`` =
    our ``layer_norm``: ``F.layer_norm`` of each layer without affine parameters) vs :class:`WeightedSum`: the
    same per-utterance features and the same gradient on the layer weights, with trained (unequal) weights."""
    L, D, lens = 5, 6, [9, 4, 7]
    ours = WeightedSum(L, D, layer_norm=layer_norm).double()
    with torch.no_grad():
        ours.weights.copy_(torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7]))
    theirs = _s3prl_featurizer(ours)
    g = torch.Generator().manual_seed(1)
    layers = torch.randn(L, len(lens), max(lens), D, generator=g, dtype=torch.float64) * 3 + 1
    lens_t = torch.tensor(lens)
    out, per_utt = ours(layers), _featurize(theirs, layers, lens_t)
    probe = torch.randn(len(lens), max(lens), D, generator=g, dtype=torch.float64)
    for b, n in enumerate(lens):
        torch.testing.assert_close(out[b, :n], per_utt[b], **TOL)
    sum((out[b, :n] * probe[b, :n]).sum() for b, n in enumerate(lens)).backward()
    sum((f * probe[b, : len(f)]).sum() for b, f in enumerate(per_utt)).backward()
    torch.testing.assert_close(ours.weights.grad, theirs.weights.grad, **TOL)
    # the reference sees the option: s3prl with `normalize` the other way gives other features
    flipped = _s3prl_featurizer(WeightedSum(L, D, layer_norm=not layer_norm).double())
    with torch.no_grad():
        flipped.weights.copy_(ours.weights)
    assert not torch.allclose(_featurize(flipped, layers, lens_t)[0], per_utt[0])


# ------------------------------------------------------------------------------------------------ PR (CTC)
PHONES = ["aa", "ae", "b", "d", "iy", "k", "s", "t"]


def _ctc_expert(tmp_path, upstream_dim: int, phones: list[str]):
    """s3prl's PR expert as ``libriphone.yaml`` builds it (phones = the vocab file, one per line)."""
    expert_mod = _s3prl("s3prl.downstream.ctc.expert")
    vocab = tmp_path / "phoneme.txt"
    vocab.write_text("".join(p + "\n" for p in phones))
    conf = {"corpus": {"name": "libriphone"}, "text": {"mode": "word", "vocab_file": str(vocab)},
            "model": {"project_dim": 256, "zero_infinity": True, "select": "FrameLevel"},
            "metric": ["per"], "metric_higher_better": False}
    return expert_mod.DownstreamExpert(upstream_dim, RATE, conf, str(tmp_path)).double()


def _s3prl_hypotheses(expert, x, lens, labels) -> list[str]:
    """s3prl's greedy hypotheses, one utterance at a time as its dev/test loaders give them
    (``ctc/data.py`` ``EVAL_BATCH_SIZE = 1``): its ``argmax`` is not cut to each row's length, so in a padded
    batch a shorter row's hypothesis would read the padding frames too (ours cuts every row: batching does not
    change a hypothesis)."""
    assert _s3prl("s3prl.downstream.ctc.data").EVAL_BATCH_SIZE == 1
    out = []
    for b, n in enumerate(lens):
        records = defaultdict(list)
        expert("test", [x[b, :n]], [labels[b]], ["u"], records)
        out += records["hypothesis"]
    return out


def _pr_batch():
    refs = [["b", "iy", "t"], ["k", "ae", "t", "s"], ["d", "aa"], ["s", "iy", "s", "iy", "k"]]
    return refs, [11, 9, 5, 14]


def test_pr_head_equals_s3prl_ctc_expert_with_its_vocabulary(tmp_path):
    """s3prl ``downstream/ctc/expert.py`` (``projector`` Linear to ``project_dim`` 256, ``FrameLevel`` = one
    Linear, ``nn.CTCLoss(blank=<pad>, zero_infinity=True)``, greedy decoding with repeats and blanks removed) vs
    our PR task (``FrameLinear``, ``CTCTask.loss``, ``CTCTask.decode``).

    Deliberate difference: s3prl's ``WordTextEncoder`` reserves ``<pad>`` (the blank) ``<eos>`` ``<unk>`` and
    appends ``<eos>`` to every target, so its head learns to emit an end token CTC does not need; ours has
    ``<blank>`` + the training phones and no end token. With our vocabulary set to s3prl's (``<eos>``, ``<unk>``
    as tokens after the blank, ``<eos>`` appended to each target) the head, loss, gradients and hypotheses are
    s3prl's."""
    D = 20
    cfg = load_superb_config("pr")
    assert cfg.head.proj_dim == 256 and cfg.optim.lr == 1e-2            # libriphone.yaml
    task = make_task(cfg)
    task.vocab = ["<blank>", "<eos>", "<unk>"] + PHONES                 # s3prl's ids: <pad>=0 <eos>=1 <unk>=2
    head = task.build_head(D).double()
    _randomize(head, 0)
    theirs = _ctc_expert(tmp_path, D, PHONES)
    assert theirs.tokenizer.vocab_size == len(task.vocab) and theirs.model.linear.out_features == len(task.vocab)
    _copy_linear(theirs.projector, head.proj)
    _copy_linear(theirs.model.linear, head.out)
    refs, lens = _pr_batch()
    x, lens_t = _inputs(D, lens)

    labels = [theirs.tokenizer.encode(" ".join(r)) for r in refs]       # s3prl's targets: phone ids + <eos>
    assert all(lab[-1] == theirs.tokenizer.eos_idx for lab in labels)
    records = defaultdict(list)
    loss_theirs = theirs("train", [x[b, :n] for b, n in enumerate(lens)], labels, [f"u{b}" for b in range(4)],
                         records)
    loss_ours = task.loss(head, x, lens_t, [r + ["<eos>"] for r in refs])
    torch.testing.assert_close(loss_ours, loss_theirs, **TOL)
    loss_ours.backward()
    loss_theirs.backward()
    for a, b in [(head.proj.weight, theirs.projector.weight), (head.proj.bias, theirs.projector.bias),
                 (head.out.weight, theirs.model.linear.weight), (head.out.bias, theirs.model.linear.bias)]:
        torch.testing.assert_close(a.grad, b.grad, **TOL)
    assert records["groundtruth"] == [" ".join(r) for r in refs]
    with torch.no_grad():
        hyps = [[t for t in h if t != "<eos>"] for h in task.decode(head, x, lens_t)]   # s3prl drops <eos>
        assert _s3prl_hypotheses(theirs, x, lens, labels) == [" ".join(h) for h in hyps]
    assert any(hyps), "a random head decodes to nothing: the hypotheses would compare nothing"


def test_pr_head_equals_s3prl_ctc_expert_on_our_vocabulary(tmp_path):
    """Our PR head as it runs (vocabulary ``<blank>`` + phones, targets without ``<eos>``) is s3prl's head with
    its ``<eos>`` / ``<unk>`` outputs never winning (their logits at -1e4: exactly zero probability in float64)
    and targets without ``<eos>``: the same log-probabilities, CTC loss and hypotheses. s3prl's own targets
    (``<eos>`` appended) give another loss: the one documented difference."""
    D = 20
    task = make_task(load_superb_config("pr"))
    task.vocab = ["<blank>"] + PHONES
    head = task.build_head(D).double()
    _randomize(head, 1)
    theirs = _ctc_expert(tmp_path, D, PHONES)
    _copy_linear(theirs.projector, head.proj)
    with torch.no_grad():   # s3prl rows: 0 <pad> (= our blank), 1 <eos>, 2 <unk>, 3.. our phones
        keep = [0] + list(range(3, 3 + len(PHONES)))
        theirs.model.linear.weight.zero_()
        theirs.model.linear.bias.fill_(-1e4)
        theirs.model.linear.weight[keep] = head.out.weight
        theirs.model.linear.bias[keep] = head.out.bias
    refs, lens = _pr_batch()
    x, lens_t = _inputs(D, lens, seed=1)
    feats = [x[b, :n] for b, n in enumerate(lens)]
    ids = [[3 + PHONES.index(p) for p in r] for r in refs]               # s3prl's ids of our targets, no <eos>
    records = defaultdict(list)
    with torch.no_grad():
        loss_theirs = theirs("dev", feats, ids, ["u"] * 4, records)
        loss_ours = task.loss(head, x, lens_t, refs)
        torch.testing.assert_close(loss_ours, loss_theirs, **TOL)
        assert _s3prl_hypotheses(theirs, x, lens, ids) == [" ".join(h) for h in task.decode(head, x, lens_t)]
        with_eos = theirs("dev", feats, [theirs.tokenizer.encode(" ".join(r)) for r in refs], ["u"] * 4,
                          defaultdict(list))
    assert float(with_eos) > float(loss_ours) + 1.0   # <eos> at -1e4: s3prl's targets are (nearly) impossible


# ------------------------------------------------------------------------------------------------ SID
class _Speakers:
    """Stands in for s3prl's ``SpeakerClassifiDataset`` (which reads VoxCeleb1 from disk in ``__init__``): the
    expert asks it for ``speaker_num`` and ``label2speaker``."""

    speaker_num = 0

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def label2speaker(cls, labels):
        return [f"spk{i}" for i in labels]


def _sid_expert(monkeypatch, tmp_path, upstream_dim: int, speakers: int):
    expert_mod = _s3prl("s3prl.downstream.voxceleb1.expert")
    monkeypatch.setattr(expert_mod, "SpeakerClassifiDataset", type("Speakers", (_Speakers,), {"speaker_num": speakers}))
    conf = {"datarc": {"file_path": str(tmp_path), "meta_data": str(tmp_path / "meta"), "max_timestep": 128000},
            "modelrc": {"projector_dim": 256, "select": "UtteranceLevel", "UtteranceLevel": {"pooling": "MeanPooling"}}}
    return expert_mod.DownstreamExpert(upstream_dim, conf, str(tmp_path)).double()


def test_sid_head_and_featurizer_equal_s3prl_voxceleb1_expert(monkeypatch, tmp_path):
    """s3prl ``upstream/interfaces.py`` ``Featurizer`` followed by ``downstream/voxceleb1/expert.py``
    (``projector`` Linear to ``projector_dim`` 256, ``UtteranceLevel`` = ``MeanPooling`` over each utterance's
    frames + ``FrameLevel`` Linear, ``nn.CrossEntropyLoss``) vs our weighted sum + SID task (``MeanPoolLinear``,
    ``Classification.loss``): the same logits, loss, predictions and gradients of every parameter, layer weights
    included, on a padded batch (padding must not enter the mean)."""
    L, D, S, lens = 3, 12, 5, [7, 3, 10, 6]
    cfg = load_superb_config("sid")
    assert cfg.head.proj_dim == 256 and cfg.optim.lr == 1e-4 and cfg.optim.optimizer == "adam"   # config.yaml
    task = make_task(cfg)
    task.classes = [[f"spk{i}" for i in range(S)]]
    featurizer, head = WeightedSum(L, D).double(), task.build_head(D).double()
    _randomize(head, 2)
    with torch.no_grad():
        featurizer.weights.copy_(torch.tensor([0.5, -0.4, 1.1]))
    s3_feat = _s3prl_featurizer(featurizer)
    theirs = _sid_expert(monkeypatch, tmp_path, D, S)
    _copy_linear(theirs.projector, head.proj)
    _copy_linear(theirs.model.post_net.linear, head.outs[0])
    g = torch.Generator().manual_seed(3)
    layers = torch.randn(L, len(lens), max(lens), D, generator=g, dtype=torch.float64)
    layers[:, 1, 3:] = 100.0           # padding, large: a mean over it would show
    lens_t = torch.tensor(lens)
    labels = [3, 0, 4, 3]

    logits_theirs = []
    theirs.model.register_forward_hook(lambda m, i, o: logits_theirs.append(o[0]))
    records = defaultdict(list)
    loss_theirs = theirs("train", _featurize(s3_feat, layers, lens_t), labels, [f"u{b}" for b in range(4)], records)
    x = featurizer(layers)
    loss_ours = task.loss(head, x, lens_t, [(f"spk{i}",) for i in labels])
    torch.testing.assert_close(head(x, lens_t)[0], logits_theirs[0], **TOL)
    torch.testing.assert_close(loss_ours, loss_theirs, **TOL)
    loss_ours.backward()
    loss_theirs.backward()
    pairs = [(featurizer.weights, s3_feat.weights), (head.proj.weight, theirs.projector.weight),
             (head.proj.bias, theirs.projector.bias), (head.outs[0].weight, theirs.model.post_net.linear.weight),
             (head.outs[0].bias, theirs.model.post_net.linear.bias)]
    for a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, **TOL)
    assert featurizer.weights.grad.abs().min() > 0
    pred = logits_theirs[0].argmax(-1).tolist()
    assert records["acc"] == [float(p == y) for p, y in zip(pred, labels)]
    assert records["predict_speaker"] == [task.classes[0][i] for i in head(x, lens_t)[0].argmax(-1).tolist()]


# ------------------------------------------------------------------------------------------------ ASV
def _asv_task(speakers: int, **head):
    over = [f"head.{k}={v}" for k, v in head.items()]
    task = make_task(load_superb_config("asv", None, over))
    task.speakers = [f"spk{i}" for i in range(speakers)]
    return task


def _xvector_frames(xv: XVector, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Our x-vector's last TDNN layer output ``[B, C, T]`` (after its ReLU), caught on the way to the pooling."""
    out = []
    handle = xv.tdnn[-1].register_forward_hook(lambda m, i, o: out.append(F.relu(o)))
    xv(x, lens)
    handle.remove()
    return out[0]


def test_xvector_tdnn_stack_equals_s3prl_xvector_on_every_frame_it_computes():
    """s3prl ``downstream/sv_voxceleb1/model.py`` ``XVector`` (five ``TDNN`` layers: ``F.unfold`` context +
    Linear + ReLU; contexts 5/3/3/1/1, dilations 1/2/3/1/1; ``input_dim`` channels, ``agg_dim`` 1500 last) and the
    expert's ``connector`` Linear vs our ``XVector`` projector + ``tdnn`` at our defaults (512, 1500): Conv1d weights
    ``[C_out, C_in, k]`` are the TDNN Linear's ``[C_out, k * C_in]`` regrouped (context-major).

    Deliberate difference: s3prl's TDNN is a *valid* convolution (each utterance loses 14 frames: 4 + 4 + 6); ours
    pads to the same length (frames near the ends see zeros, no frame is lost, so a 0.3 s utterance keeps its
    statistics). On the frames s3prl computes — ours from the 8th to the 8th-last — the outputs are equal."""
    task = _asv_task(4)
    cfg = task.cfg.head
    assert (cfg.proj_dim, cfg.emb_dim, cfg.am_s, cfg.am_m) == (512, 512, 30.0, 0.4)   # configs/amsoftmax.yaml
    assert (task.cfg.optim.optimizer, task.cfg.optim.lr) == ("adamw", 1e-4)
    assert [list(t) for t in cfg.tdnn] == [[512, 5, 1], [512, 3, 2], [512, 3, 3], [512, 1, 1], [1500, 1, 1]]
    D = 24
    head = task.build_head(D).double()
    _randomize(head, 4)
    connector = nn.Linear(D, 512).double()                       # sv_voxceleb1/expert.py: the "connector"
    _copy_linear(connector, head.xvector.proj)
    theirs = s3prl_sv.XVector(input_dim=512, agg_dim=1500, dropout_p=0.0, batch_norm=False).double()
    for conv, tdnn in zip(head.xvector.tdnn, theirs.module):
        assert (tdnn.context_size, tdnn.dilation) == (conv.kernel_size[0], conv.dilation[0])
        with torch.no_grad():
            tdnn.kernel.weight.copy_(conv.weight.permute(0, 2, 1).reshape(conv.out_channels, -1))
            tdnn.kernel.bias.copy_(conv.bias)
    lens = [30, 17, 24]
    x, lens_t = _inputs(D, lens, seed=4)
    ours = _xvector_frames(head.xvector, x, lens_t)                                  # [B, 1500, T]
    for b, n in enumerate(lens):
        ref = theirs(connector(x[b: b + 1, :n]), None)[0]                            # [n - 14, 1500]
        assert ref.shape == (n - 14, 1500)
        torch.testing.assert_close(ours[b, :, 7: n - 7].T, ref, **TOL)
    assert ours.shape[-1] == max(lens)   # ours: every frame kept (the 7 at each end see the zero padding)


def test_statistics_pooling_is_s3prl_sp_up_to_the_std_estimator():
    """s3prl ``SP`` (statistics pooling: mean and ``torch.std`` of each utterance's frames) vs the pooling of our
    ``XVector`` (caught at the input of its embedding layer; no TDNN layer, no projector, so the frames are the
    input).

    Deliberate difference: ``torch.std`` is the unbiased estimator (n - 1); ours is the population one (n,
    floored at 1e-5 variance), defined for a one-frame utterance. Our std times ``sqrt(n / (n - 1))`` is s3prl's.
    s3prl scores each trial utterance alone (``eval_batch_size: 1``); in its padded training batches a shorter
    row's statistics take one padded frame in (``nonzero(mask < 0)[0] + 1``); ours take exactly ``lens`` frames
    whatever the batch, which is checked here too."""
    D, lens = 6, [9, 5, 12]
    xv = XVector(D, proj_dim=0, tdnn=(), emb_dim=4).double()
    x, lens_t = _inputs(D, lens, seed=5)
    x = x + 2.0 * (torch.arange(max(lens))[None, :, None] >= lens_t[:, None, None])   # non-zero padding
    stats = []
    xv.emb.register_forward_hook(lambda m, i, o: stats.append(i[0]))
    xv(x, lens_t)
    sp = s3prl_sv.SP(out_dim=D, input_dim=D)
    for b, n in enumerate(lens):
        ref = sp(x[b: b + 1, :n], torch.zeros(1, n, dtype=torch.float64))[0]        # s3prl: one utterance
        mean, std = stats[0][b, :D], stats[0][b, D:]
        torch.testing.assert_close(mean, ref[:D], **TOL)
        torch.testing.assert_close(std * math.sqrt(n / (n - 1)), ref[D:], **TOL)
        assert not torch.allclose(std, ref[D:])
        xv(x[b: b + 1, :n], lens_t[b: b + 1])                                       # alone = in the batch
        torch.testing.assert_close(stats[-1][0], stats[0][b], **TOL)
    # s3prl's padded batch: the 5-frame row's statistics take a 6th (padded) frame in
    mask = (1.0 - (torch.arange(max(lens))[None, :] < lens_t[:, None]).double()) * -100000.0
    batch = sp(x, mask)
    torch.testing.assert_close(batch[1, :D], x[1, :6].mean(0), **TOL)


def test_am_softmax_equals_s3prl_am_softmax_loss():
    """s3prl ``AMSoftmaxLoss`` (``W`` ``[H, S]``, normalised columns; ``-log(e^{s(cos_y - m)} / (e^{s(cos_y - m)}
    + sum_{j != y} e^{s cos_j}))``) vs our ``AMSoftmax`` (``weight`` ``[S, H]`` = ``W.T``): the same loss and
    gradients (embeddings and class weights) at SUPERB's s = 30, m = 0.4, and at other values."""
    for s, m in [(30.0, 0.4), (15.0, 0.2)]:
        task = _asv_task(7, am_s=s, am_m=m, emb_dim=16)
        ours = task.build_head(10).double().amsoftmax
        theirs = s3prl_sv.AMSoftmaxLoss(hidden_dim=16, speaker_num=7, s=s, m=m).double()
        _randomize(ours, 6)
        with torch.no_grad():
            theirs.W.copy_(ours.weight.T)
        g = torch.Generator().manual_seed(7)
        emb = torch.randn(9, 16, generator=g, dtype=torch.float64) * 3
        labels = torch.tensor([0, 3, 6, 2, 2, 5, 1, 4, 0])
        e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
        l_ours, l_theirs = ours(e1, labels), theirs(e2, labels)
        torch.testing.assert_close(l_ours, l_theirs, **TOL)
        l_ours.backward()
        l_theirs.backward()
        torch.testing.assert_close(e1.grad, e2.grad, **TOL)
        torch.testing.assert_close(ours.weight.grad, theirs.W.grad.T, **TOL)
        no_margin = F.cross_entropy(s * ours.cosine(emb), labels)
        assert float(l_ours.detach()) > float(no_margin.detach())   # the margin costs


def test_xvector_embedding_layer_differs_from_s3prl_utterance_extractor_as_documented():
    """s3prl ``UtteranceExtractor``: ``linear1`` + ReLU is the embedding scored on trials (``inference``); training
    adds ``linear2`` + ReLU before the AM-softmax. Ours: one Linear (``emb``), no ReLU, the same embedding trained
    and scored. With ``linear1`` = our ``emb``, s3prl's trial embedding is ReLU(ours)."""
    D = 8
    xv = XVector(D, proj_dim=0, tdnn=(), emb_dim=5).double()
    _randomize(xv, 8)
    theirs = s3prl_sv.UtteranceExtractor(input_dim=2 * D, out_dim=5).double()
    _copy_linear(theirs.linear1, xv.emb)
    x, lens = _inputs(D, [6, 9], seed=8)
    stats = []
    xv.emb.register_forward_hook(lambda m, i, o: stats.append(i[0]))
    emb = xv(x, lens)
    torch.testing.assert_close(theirs.inference(stats[0]), F.relu(emb), **TOL)
    assert (emb < 0).any()   # so the ReLU is a difference, not a no-op


def test_stubs_do_not_outlive_the_import():
    """The torchaudio / editdistance stand-ins exist only while an expert module is imported: later code that asks
    for torchaudio gets the truth (here: not installed), not a stub."""
    _s3prl("s3prl.downstream.ctc.expert")
    for name in ("torchaudio", "torchaudio.sox_effects", "editdistance"):
        mod = sys.modules.get(name)
        assert mod is None or getattr(mod, "__file__", None), name
