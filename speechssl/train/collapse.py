"""Collapse watch: cheap, label-free signs that the representations of a pretraining run are collapsing.

At every validation the trainer runs the encoder (eval mode, no masking, no gradient, fp32) over a *fixed* sample
of dev frames and computes, for every hidden layer (the upstream convention: the input of every transformer layer
plus the encoder output, ``L0`` ... ``LN``):

* the **effective rank** of the ``[frames, dim]`` embedding matrix, RankMe (Garrido et al. 2023, "RankMe: Assessing
  the downstream performance of pretrained self-supervised representations by their rank"): ``exp`` of the entropy
  of the normalised singular values, see :func:`rankme`;
* the **mean per-dimension standard deviation** over frames, see :func:`mean_std`.

Both go to the log (one line per validation) and to TensorBoard (``collapse/rank_L{i}``, ``collapse/std_L{i}``).
A layer whose rank falls below ``RANK_FLOOR`` (0.1) of its update-0 value gets a warning that names it. Why a tenth
and not a half: an untrained encoder is nearly isotropic (rank ~186 of 256 on every layer of the mini_synth tiny
model), and healthy training concentrates the upper layers (measured on mini_synth, 600 updates: the top layer at
0.27-0.34 of its update-0 rank, the lower ones at 0.6-0.9), while the feature-penalty collapse of issue 16 took
layers 3-6 to 0.01-0.03 within 200 updates. Labels play no part: a
run whose masked accuracy looks fine can still be squeezing its layers onto a few directions, and a run with
broken labels shows it here too.

The update-0 reference is measured once, before the first update of a new run (after ``ckpt.init_from``), and
recorded in ``EXP/collapse_watch.json`` and in every checkpoint directory. A resumed run reads it back (the
checkpoint's copy first, then the exp dir's) instead of re-measuring a model that is no longer at update 0.

The sample: the first dev batches in the dev loader's fixed order (no shuffling; crops are a hash of seed and
utterance id), every valid frame of each utterance, until ``max_frames`` frames (the last utterance is cut).
It is held on the CPU (4096 frames at 50 Hz are 82 s of audio, 5 MB); measuring it costs a few encoder forwards.
Under DDP only rank 0 builds and measures it (on its own dev shard), with no collective, so no rank waits on it.
Measuring runs under :func:`speechssl.train.state.preserved_rng` and restores the encoder's train/eval mode, so
it moves no RNG: a resumed run stays bit-identical whatever the validation schedule.

    watch = CollapseWatch.from_batches(dev_loader, encoder.num_frames, max_frames=4096, source="data/dev")
    watch.start(encoder, exp_dir)                  # new run: measure + write EXP/collapse_watch.json
    stats = watch.check(encoder, step, writer)     # at every validation: log, TensorBoard, warnings
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from speechssl.errors import UserError
from speechssl.fileio import atomic_write_text
from speechssl.train.data import batch_wavs
from speechssl.train.state import preserved_rng

log = logging.getLogger(__name__)

__all__ = ["CollapseWatch", "rankme", "mean_std", "REFERENCE_FILE", "RANK_FLOOR"]

REFERENCE_FILE = "collapse_watch.json"  # in the exp dir and in every checkpoint directory
RANK_FLOOR = 0.1  # warn when a layer's effective rank is below this fraction of its update-0 value (module doc)
RANKME_EPS = 1e-7  # the paper's epsilon
_RNG_SEED = 0xC011A95E  # any fixed seed: the encoder in eval mode draws nothing, this only guards against it
_METHOD = (
    "rank: RankMe, exp(-sum p log p), p = s / sum(s) + 1e-7 over the singular values s of the uncentred "
    "[frames, dim] matrix of one hidden layer (float64); std: mean over dims of the per-dim std over frames"
)

LayerStats = dict[int, dict[str, float]]  # {layer: {"rank": r, "std": s}}


# ============================================================================================== measures
def _singular_values(x: Tensor) -> Tensor:
    """Singular values of ``x`` [N, D] in float64; from the eigenvalues of the smaller Gram matrix when it is smaller
    than ``x`` (``N D^2`` work instead of a full SVD; a relative error ~1e-8 of the largest value, far below
    anything the entropy notices)."""
    x = x.detach().to(torch.float64)
    n, d = x.shape
    if n > 2 * d or d > 2 * n:
        gram = x.T @ x if n > d else x @ x.T
        try:
            return torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt()
        except torch.linalg.LinAlgError:  # pragma: no cover - LAPACK did not converge; the SVD is slower, not worse
            pass
    return torch.linalg.svdvals(x)


def rankme(x: Tensor, eps: float = RANKME_EPS) -> float:
    """Effective rank of the frame embeddings ``x`` [N, D] (RankMe): ``exp(-sum_k p_k log p_k)`` with
    ``p_k = s_k / sum(s) + eps`` over the singular values ``s``.

    Between ~1 (every frame on one line) and ``min(N, D)`` (isotropic); invariant to the scale of ``x``.
    As in the paper the matrix is **not centred**: an offset shared by all frames counts as one direction, so a
    layer that maps every frame to the same vector has rank ~1 whatever that vector is (centring would turn it
    into a zero matrix, whose "rank" is noise). A zero matrix has rank 1, a non-finite one ``nan``.
    """
    if x.dim() != 2:
        raise ValueError(f"rankme: expected a [frames, dim] matrix, got shape {tuple(x.shape)}")
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        return float("nan")
    s = _singular_values(x)
    total = float(s.sum())
    if total <= 0.0:
        return 1.0
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def mean_std(x: Tensor) -> float:
    """Mean over the ``D`` dimensions of the standard deviation over the ``N`` frames of ``x`` [N, D] (population
    std, float64): 0 when every frame is the same vector."""
    if x.dim() != 2:
        raise ValueError(f"mean_std: expected a [frames, dim] matrix, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return float("nan")
    return float(x.detach().to(torch.float64).std(dim=0, correction=0).mean())


# ============================================================================================== the watch
@dataclass
class _SampleBatch:
    """One dev batch of the fixed sample (CPU): the frames ``[:take[j]]`` of row ``j`` are measured."""

    wavs: Tensor
    wav_lens: Tensor
    ids: list[str]
    take: list[int]


class CollapseWatch:
    """Effective rank and mean std per hidden layer on a fixed dev sample, against the update-0 values.

    Build it with :meth:`from_batches`, set the reference with :meth:`start` (measure at update 0 or read it back
    on resume), then call :meth:`check` at every validation. ``encoder`` is anything following the upstream
    contract, ``encoder(wavs, wav_lens) -> (hidden_states, frame_lens)`` (``HubertModel``, the trainer's
    ``model.hubert``).
    """

    def __init__(self, batches: list[_SampleBatch], *, max_frames: int, source: str = ""):
        if not batches:
            raise UserError("collapse watch: the dev loader gave no batch to sample frames from; "
                             "set collapse_watch_frames=0 to train without the watch")
        self.batches = batches
        self.max_frames = int(max_frames)
        self.source = source
        self.num_frames = sum(sum(b.take) for b in batches)
        self.reference: LayerStats | None = None  # update-0 values
        self.reference_path: Path | None = None

    # ------------------------------------------------------------------------------------------ sample
    @classmethod
    def from_batches(cls, batches: Iterable[dict], num_frames: Callable[[Tensor], Tensor], *,
                     max_frames: int = 4096, source: str = "") -> "CollapseWatch":
        """The first ``max_frames`` valid frames of ``batches`` (dicts with ``wavs`` [B, S], read through
        ``speechssl.train.data.batch_wavs``, ``wav_lens`` [B] and ``ids``, e.g. the trainer's dev loader), in order;
        ``num_frames(wav_lens)`` gives the encoder frames.

        Iterates under a preserved RNG: a DataLoader draws its workers' base seed from the global torch RNG.
        """
        if max_frames < 1:
            raise UserError(f"collapse watch: max_frames must be >= 1, got {max_frames}")
        picked: list[_SampleBatch] = []
        total = 0
        with preserved_rng(_RNG_SEED):
            for batch in batches:
                frames = [int(n) for n in num_frames(batch["wav_lens"].cpu())]
                rows, take = [], []
                for j, n in enumerate(frames):
                    t = min(n, max_frames - total)
                    if t > 0:
                        rows.append(j)
                        take.append(t)
                        total += t
                if rows:
                    idx = torch.tensor(rows)
                    picked.append(_SampleBatch(
                        wavs=batch_wavs(batch)[idx].cpu().clone(), wav_lens=batch["wav_lens"][idx].cpu().clone(),
                        ids=[batch["ids"][j] for j in rows], take=take,
                    ))
                if total >= max_frames:
                    break
        return cls(picked, max_frames=max_frames, source=source)

    def sample_definition(self) -> dict[str, Any]:
        """What was measured: the source, and ``[utterance id, frames]`` in order (crops as in validation)."""
        return {
            "source": self.source,
            "order": "first dev batches in loader order, every valid frame, cut at max_frames",
            "utterances": [[u, t] for b in self.batches for u, t in zip(b.ids, b.take)],
        }

    # ------------------------------------------------------------------------------------------ measuring
    @torch.no_grad()
    def measure(self, encoder: nn.Module) -> LayerStats:
        """``{layer: {"rank": r, "std": s}}`` of the encoder on the sample (eval mode, no mask, fp32).

        The encoder's train/eval mode and every RNG are restored afterwards.
        """
        try:
            device = next(encoder.parameters()).device
        except StopIteration:  # a parameter-free encoder (tests)
            device = torch.device("cpu")
        was_training = encoder.training
        encoder.eval()
        per_layer: list[list[Tensor]] = []
        try:
            with preserved_rng(_RNG_SEED):
                for b in self.batches:
                    hidden, frame_lens = encoder(b.wavs.to(device), b.wav_lens.to(device))
                    lens = [min(t, int(n)) for t, n in zip(b.take, frame_lens)]
                    if not per_layer:
                        per_layer = [[] for _ in hidden]
                    for i, h in enumerate(hidden):
                        per_layer[i].extend(h[j, :n].float() for j, n in enumerate(lens))
        finally:
            encoder.train(was_training)
        out: LayerStats = {}
        for i, rows in enumerate(per_layer):
            x = torch.cat(rows, dim=0)
            out[i] = {"rank": rankme(x), "std": mean_std(x)}
        return out

    # ------------------------------------------------------------------------------------------ reference
    def start(self, encoder: nn.Module, exp_dir: str | Path, *, resumed_from: str | Path | None = None) -> None:
        """Set the update-0 reference and make sure ``EXP/collapse_watch.json`` holds it.

        A new run (``resumed_from=None``) measures ``encoder`` now and writes the file. A resumed run reads it
        back, from the checkpoint's copy (``resumed_from/collapse_watch.json``) or else from the exp dir's; without
        either (a run started with the watch off, an old checkpoint) the values are still logged at every
        validation but no collapse warning can fire.
        """
        exp_file = Path(exp_dir) / REFERENCE_FILE
        if resumed_from is None:
            self.reference = self.measure(encoder)
            self.reference_path = exp_file
            self.save(exp_dir)
            log.info("collapse watch: update-0 values on %d frames of %d dev utterances (recorded in %s): %s",
                     self.num_frames, sum(len(b.ids) for b in self.batches), exp_file, _fmt_layers(self.reference))
            return
        for path in (Path(resumed_from) / REFERENCE_FILE, exp_file):
            if path.is_file():
                self._load(path)
                if not exp_file.is_file():
                    self.save(exp_dir)
                return
        log.warning("collapse watch: no %s in %s or %s, so no update-0 reference: the effective ranks are logged "
                    "but no collapse warning can fire in this run", REFERENCE_FILE, resumed_from, exp_dir)

    def _load(self, path: Path) -> None:
        try:
            obj = json.loads(path.read_text())
            self.reference = {int(e["layer"]): {"rank": float(e["rank"]), "std": float(e["std"])}
                              for e in obj["layers"]}
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a collapse watch reference ({e}); delete it to go on without one") from e
        self.reference_path = path
        if obj.get("sample", {}).get("utterances") != self.sample_definition()["utterances"]:
            log.warning("collapse watch: the dev sample differs from the one the update-0 values in %s were "
                        "measured on (another dev set, crop or world size); the comparison is approximate", path)
        log.info("collapse watch: update-0 values read from %s: %s", path, _fmt_layers(self.reference))

    def reference_json(self) -> dict[str, Any]:
        """The content of ``collapse_watch.json``."""
        if self.reference is None:
            raise RuntimeError("collapse watch: no update-0 reference yet (call start())")
        return {
            "update": 0,
            "frames": self.num_frames,
            "max_frames": self.max_frames,
            "method": _METHOD,
            "layers": [{"layer": i, "rank": v["rank"], "std": v["std"]} for i, v in sorted(self.reference.items())],
            "sample": self.sample_definition(),
        }

    def save(self, directory: str | Path) -> None:
        """Write ``directory/collapse_watch.json`` atomically (the exp dir, a checkpoint being assembled);
        nothing when there is no reference."""
        if self.reference is None:
            return
        atomic_write_text(Path(directory) / REFERENCE_FILE, json.dumps(self.reference_json(), indent=1) + "\n")

    # ------------------------------------------------------------------------------------------ validation
    def collapsed_layers(self, now: LayerStats) -> list[int]:
        """Layers whose rank is below ``RANK_FLOOR`` of their update-0 rank (or not finite)."""
        if self.reference is None:
            return []
        return [i for i, v in sorted(now.items())
                if i in self.reference and not v["rank"] >= RANK_FLOOR * self.reference[i]["rank"]]

    def check(self, encoder: nn.Module, step: int, writer: Any = None) -> dict[str, float]:
        """Measure, log one line, write TensorBoard scalars, warn for each collapsed layer.

        Returns ``{"rank_L{i}": r, "std_L{i}": s}`` for the validation stats.
        """
        now = self.measure(encoder)
        log.info("collapse watch at update %d: %s", step, _fmt_layers(now))
        if writer is not None:
            for i, v in sorted(now.items()):
                writer.add_scalar(f"collapse/rank_L{i}", v["rank"], step)
                writer.add_scalar(f"collapse/std_L{i}", v["std"], step)
        ref = self.reference or {}
        for i in self.collapsed_layers(now):
            log.warning(
                "collapse watch: layer %d effective rank %.1f fell below %g of its update-0 value %.1f "
                "(update %d; mean std %.3g, was %.3g): its frame embeddings are collapsing onto a few directions. "
                "Check the loss and accuracy curves, lower optim.lr, or resume from an earlier checkpoint",
                i, now[i]["rank"], RANK_FLOOR, ref[i]["rank"], step, now[i]["std"], ref[i]["std"],
            )
        stats: dict[str, float] = {}
        for i, v in sorted(now.items()):
            stats[f"rank_L{i}"] = v["rank"]
            stats[f"std_L{i}"] = v["std"]
        return stats


def _fmt_layers(stats: LayerStats) -> str:
    return " | ".join(f"L{i} rank={v['rank']:.1f} std={v['std']:.3g}" for i, v in sorted(stats.items()))
