"""What each layer learned: k-means units of every hidden layer of a checkpoint, scored against phone alignments.

``speechssl units layers`` (HuBERT paper §IV-F, the figure of PNMI by layer) without dumping any layer to disk:

* **pass 0** reads every utterance's length (headers where possible) so the frame count of each layer is known;
  the sample is then planned exactly as ``kmeans fit`` would draw it from a one-shard store of that layer
  (:func:`~speechssl.units.kmeans.sample_indices`, same seed for every layer, as separate fits would use);
* **pass 1** runs the model once per utterance (batch of one, :func:`speechssl.upstream.layers_extractor`: the
  numbers are those of ``upstream.layer_extractor`` and so of ``speechssl extract --max-duration 0``; batched
  extraction differs by float rounding only) and feeds one
  :class:`~speechssl.units.kmeans.StreamSampler` per layer (float16, as the layer stores are). Memory is the
  samples: ``n x dim x 2 B`` per layer, printed before starting; ``--max-frames`` caps ``n``;
* **fit**: :func:`~speechssl.units.fit.fit_sample` per layer on its sample (the code of ``kmeans fit``);
* **pass 2** runs the model again, assigns every frame of every layer to its nearest centroid, reads the phone
  at each frame centre off the alignment and adds to one ``[phones, k]`` count table per layer
  (:class:`~speechssl.units.quality.PhoneUnitCounts`, the counting of ``units quality``). Labels are never
  stored. Metrics come from :func:`~speechssl.units.quality.quality_from_counts`, as ``units quality``; so does
  the alignment/audio length rule (:func:`~speechssl.units.alignments.frame_coverage`: frames past the
  alignment's end unscored, overhang clipped, both counted under ``alignment_coverage`` in ``layers.json``; a gap
  beyond ``max(0.5 s, 10 %)`` of the utterance is an error).

**Random-init baseline** (on unless ``baseline=False`` / ``--no-baseline``): an untrained model of the
checkpoint's config (:func:`speechssl.upstream.random_init`, seeded with ``seed``) goes through the same two
passes beside the trained one: same utterances, same sampled frame indices (the configs are equal, so are the
frame counts), same ``k`` and k-means seed, its own samplers, centroids and count tables. ``layers.json`` gets its
rows under ``random_init`` and each trained row its ``ratio_to_random`` (PNMI over the random model's PNMI at
that layer); ``best_layer`` is still the argmax of the trained model's PNMI.

The MFCC store (``--mfcc``), if given, gets the same treatment at the same ``k``, sample fraction and seed, on
the same utterances, at its own frame rate (100 Hz; the model's is 50 Hz): each is scored against the alignment
at its own frame centres. When the evaluated utterances are the whole store, in store order, its shard layout
is used for the sample plan, so the MFCC numbers equal ``kmeans fit`` + ``kmeans label`` + ``units quality``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from speechssl import __version__
from speechssl.data.batching import prefetch
from speechssl.audio import SAMPLE_RATE
from speechssl.data.kaldi import c_sorted
from speechssl.errors import UserError
from speechssl.fileio import atomic_path, atomic_write_text, check_writable_dir
from speechssl.progress import progress_bar
from speechssl.units.alignments import CoverageStats, read_alignments, SILENCE
from speechssl.units.fit import Assigner, FitOptions, fit_sample, memory_estimate, resolve_device
from speechssl.units.labels import framing_from_features
from speechssl.units.quality import PhoneUnitCounts, quality_from_counts
from speechssl.units.sampling import StreamSampler, sample_indices, sample_size
from speechssl.upstream import layer_feature_meta, layers_extractor, parse_layers

__all__ = ["layer_feature_meta", "parse_layers", "select_utterances", "evaluate_layers", "plot_layers"]

log = logging.getLogger(__name__)


def select_utterances(utt_ids: Sequence[str], *, max_utts: int | None = None, subset_frac: float | None = None,
                      seed: int = 0) -> list[str]:
    """A seeded random subset (C-sorted) of at most ``max_utts`` / a ``subset_frac`` share of the utterances."""
    ids = c_sorted(utt_ids)
    m = len(ids)
    if subset_frac is not None:
        if not 0 < subset_frac <= 1:
            raise UserError(f"--subset-frac must be in (0, 1], got {subset_frac}")
        m = max(1, int(round(subset_frac * len(ids))))
    if max_utts is not None:
        if max_utts < 1:
            raise UserError(f"--max-utts must be positive, got {max_utts}")
        m = min(m, int(max_utts))
    if m >= len(ids):
        return ids
    pick = np.random.default_rng(seed).choice(len(ids), size=m, replace=False)
    return [ids[i] for i in np.sort(pick)]


def _num_samples(utt: Any) -> int:
    """Samples of an utterance at 16 kHz: from the header for a 16 kHz file without segments, else decoded."""
    from speechssl.audio import audio_info, is_pipe
    from speechssl.data.kaldi import load_utterance

    if utt.start == 0.0 and utt.end is None and not is_pipe(utt.source):
        info = audio_info(utt.source, utt_id=utt.utt_id)
        if info.sample_rate == SAMPLE_RATE:
            return int(info.num_frames)
    return len(load_utterance(utt, SAMPLE_RATE))


TRAINED, RANDOM = "trained", "random"  # model names: keys ``(name, layer)`` of samplers, centroids, counts


def _ratio(pnmi: float, random_pnmi: float) -> float | None:
    """``pnmi / random_pnmi``; None when the random model's PNMI is 0 (no finite ratio, and JSON has no inf)."""
    return pnmi / random_pnmi if random_pnmi > 0 else None


def _fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


def evaluate_layers(
    ckpt: str | os.PathLike,
    data_dir: str | os.PathLike,
    alignments: str | os.PathLike,
    *,
    k: int,
    mfcc: str | os.PathLike | None = None,
    layers: str | Sequence[int] | None = "all",
    max_utts: int | None = None,
    subset_frac: float | None = None,
    tier: str = "phones",
    dtype: str = "float16",
    device: str = "auto",
    baseline: bool = True,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    report: Callable[[str], None] = print,
    **options: Any,
) -> dict[str, Any]:
    """PNMI / phone purity / cluster purity of k-means units of every chosen layer (and of MFCC), see module doc.

    ``options``: the k-means options of ``kmeans fit`` (:class:`~speechssl.units.fit.FitOptions`: ``sample_frac``,
    ``max_frames``, ``seed``, ``niter``, ``nredo``, ``init``); ``seed`` also draws the ``max_utts`` /
    ``subset_frac`` subset. ``baseline``: also score the random-init model of the checkpoint's config (seeded
    with ``seed``). Returns the ``layers.json`` dict; with ``out_dir`` writes ``layers.json`` and ``layers.png``.
    """
    from speechssl.data.kaldi import load_utterance, read_data_dir
    from speechssl.upstream import checkpoint_sha1, load, random_init

    opts = FitOptions(**options)
    opts.check(k)
    select_utterances([], max_utts=max_utts, subset_frac=subset_frac)  # their range checks, before any work
    if out_dir is not None:
        check_writable_dir(out_dir, "--out")  # layers.json comes after both model passes
    sample_frac, max_frames, seed = opts.sample_frac, opts.max_frames, opts.seed
    dev = resolve_device(device)
    up = load(ckpt, device=dev)
    # Every model goes through the same passes; the random-init one shares the trained one's config (and frames).
    models: list[tuple[str, Any]] = [(TRAINED, up)]
    if baseline:
        models.append((RANDOM, random_init(ckpt, seed=seed, device=dev)))
    sha1 = checkpoint_sha1(ckpt)
    chosen = parse_layers(layers, up.num_layers, str(ckpt))
    np_dtype = np.dtype(dtype)
    dd = read_data_dir(data_dir)
    ids = select_utterances(dd.utt_ids(), max_utts=max_utts, subset_frac=subset_frac, seed=seed)
    if not ids:
        raise UserError(f"{data_dir}: no utterances")
    alis = read_alignments(alignments, tier=tier)
    aligned = [u for u in ids if u in alis]
    skipped = [u for u in ids if u not in alis]
    if not aligned:
        raise UserError(f"none of the {len(ids)} utterances of {data_dir} has an alignment in {alignments} "
                         f"(e.g. {ids[:2]} vs {c_sorted(alis)[:2]}): check the utterance ids")
    if skipped:
        log.warning("%d of %d utterances have no alignment in %s (used for k-means, not scored), e.g. %s",
                    len(skipped), len(ids), alignments, skipped[:3])

    # MFCC store: every selected utterance must be in it.
    reader = None
    if mfcc is not None:
        from speechssl.features.store import FeatureReader

        reader = FeatureReader(mfcc)
        missing = [u for u in ids if u not in reader]
        if missing:
            raise UserError(f"{mfcc}: {len(missing)} utterance(s) of {data_dir} missing from the MFCC store, "
                             f"e.g. {missing[:3]}; dump MFCC for this data dir")

    # Pass 0: frames per utterance -> sample plans.
    utts = {u: dd.utterance(u) for u in ids}
    samples = {}
    for u in progress_bar(ids, desc="layers: lengths", unit="utt", disable=not progress):
        samples[u] = _num_samples(utts[u])
    frames = {u: up.num_frames(samples[u]) for u in ids}
    total = sum(frames.values())
    n = sample_size(total, sample_frac, max_frames)
    if n < k:
        raise UserError(f"sample of {n} of {total} frames per layer is smaller than k={k}; raise --sample-frac, "
                         "--max-frames or the number of utterances")
    idx = sample_indices([total], n, seed=seed)
    dims = {layer: int(up.hidden_sizes[layer]) for layer in chosen}
    keys = [(name, layer) for name, _ in models for layer in chosen]
    samplers = {(name, layer): StreamSampler(idx, dims[layer], total, np_dtype, name=f"{name} layer {layer}")
                for name, layer in keys}
    mem = sum(n * dims[layer] * np_dtype.itemsize for _, layer in keys)
    m_sampler = None
    if reader is not None:
        m_total = sum(reader.num_frames(u) for u in ids)
        m_n = sample_size(m_total, sample_frac, max_frames)
        if m_n < k:
            raise UserError(f"{mfcc}: sample of {m_n} MFCC frames is smaller than k={k}")
        # The whole store in store order: its own shard layout, so the sample is the one `kmeans fit` draws.
        layout = ([int(offs[-1]) for _, offs, _ in reader.shard_arrays()] if list(reader.ids) == ids
                  else [m_total])
        m_sampler = StreamSampler(sample_indices(layout, m_n, seed=seed), int(reader.dim or 0), m_total,
                                  np.dtype(reader.meta.get("dtype", "float32")), name=f"MFCC {mfcc}")
        mem += m_sampler.out.nbytes
    work = memory_estimate(n, max(dims.values()), k)["working"]
    report(f"units layers: {len(chosen)} layer(s) of {ckpt} ({up.frame_rate:g} Hz)"
           f"{f' and of its random init (seed {seed})' if baseline else ''}, k={k}, {len(ids)} utterances "
           f"({len(aligned)} aligned), sample {n} of {total} frames per layer; memory estimate "
           f"{(mem + work) / 2**20:.1f} MiB (samples {mem / 2**20:.1f} MiB + k-means working {work / 2**20:.1f} MiB)")

    runners = {name: layers_extractor(m, chosen, dtype=np_dtype) for name, m in models}

    def load_wav(u: str) -> np.ndarray:
        return load_utterance(utts[u], SAMPLE_RATE)

    # Pass 1: sample frames of every layer of every model (and MFCC) in one forward per model.
    for u, wav in progress_bar(prefetch(load_wav, ids), total=len(ids), desc="layers: sampling", unit="utt",
                               disable=not progress):
        if len(wav) != samples[u]:
            raise UserError(f"utt {u} ({utts[u].source}): {len(wav)} samples, header said {samples[u]}")
        for name, run in runners.items():
            for layer, h in run(wav).items():
                if len(h) != frames[u]:
                    raise ValueError(f"utt {u}: layer {layer} of the {name} model gave {len(h)} frames, "
                                     f"expected {frames[u]}")
                samplers[name, layer].feed(h)
        if m_sampler is not None:
            m_sampler.feed(reader[u])

    # Fit: the code of `kmeans fit`, one (model, layer) at a time.
    centroids: dict[Any, np.ndarray] = {}
    inertia: dict[Any, float] = {}
    for key in progress_bar(keys, desc="layers: k-means", unit="layer", disable=not progress):
        centroids[key], inertia[key] = fit_sample(samplers.pop(key).result(), k, opts, device=dev)
    if m_sampler is not None:
        centroids["mfcc"], inertia["mfcc"] = fit_sample(m_sampler.result(), k, opts, device=dev)
        m_sampler = None

    # Pass 2: assign every frame, count (phone, unit) pairs per layer.
    phones = c_sorted({p for u in aligned for p in alis[u].phones} | {SILENCE})
    assigners = {key: Assigner(c, device=dev) for key, c in centroids.items()}
    layer_framing, layer_rate = up.framing, float(up.frame_rate)  # as in the header of a dumped layer
    m_framing = framing_from_features(reader.meta) if reader is not None else None
    # Unscored / clipped frames per frame rate (every layer of both models has the model's frames: count once).
    coverage = {"layers": CoverageStats(), "mfcc": CoverageStats()}
    counted = {(TRAINED, chosen[0]): coverage["layers"], "mfcc": coverage["mfcc"]}
    counters = {key: PhoneUnitCounts(k, phones, coverage=counted.get(key, CoverageStats())) for key in centroids}

    def score(key: Any, u: str, feats: np.ndarray, rate: float, framing: Any, where: str) -> None:
        counters[key].add(assigners[key](np.asarray(feats)), alis[u], rate, framing, label_file=where)

    sources = {name: m.source for name, m in models}
    for u, wav in progress_bar(prefetch(load_wav, aligned), total=len(aligned), desc="layers: scoring", unit="utt",
                               disable=not progress):
        for name, run in runners.items():
            for layer, h in run(wav).items():
                score((name, layer), u, h, layer_rate, layer_framing, f"layer {layer} of {sources[name]}")
        if reader is not None:
            score("mfcc", u, reader[u], reader.frame_rate, m_framing, str(mfcc))

    def entry(key: Any) -> dict[str, Any]:
        counts = counters[key].counts
        return {**quality_from_counts(counts), "num_frames": int(counts.sum()),
                "units_used": int((counts.sum(0) > 0).sum()), "inertia_per_frame": inertia[key]}

    def layer_rows(name: str) -> list[dict[str, Any]]:
        return [{"layer": layer, **entry((name, layer)), "dim": dims[layer]} for layer in chosen]

    rows = layer_rows(TRAINED)
    best_row = max(rows, key=lambda r: r["pnmi"])
    best = best_row["layer"]
    random_result: dict[str, Any] | None = None
    if baseline:
        random_rows = layer_rows(RANDOM)
        random_best = max(random_rows, key=lambda r: r["pnmi"])
        for r, rr in zip(rows, random_rows):
            r["ratio_to_random"] = _ratio(r["pnmi"], rr["pnmi"])
        random_result = {"layers": random_rows, "best_layer": random_best["layer"], "best_pnmi": random_best["pnmi"],
                         "seed": seed, "source": sources[RANDOM]}
    result: dict[str, Any] = {
        "layers": rows,
        "mfcc": None,
        "random_init": random_result,
        "best_layer": best,
        "k": k,
        "checkpoint": str(ckpt),
        "checkpoint_sha1": sha1,
        "data": str(data_dir),
        "alignments": str(alignments),
        "utterances": len(aligned),
        "utterances_fit": len(ids),
        "skipped_no_alignment": len(skipped),
        "skipped_examples": skipped[:20],
        "alignment_coverage": {"layers": coverage["layers"].to_dict(),
                               "mfcc": coverage["mfcc"].to_dict() if reader is not None else None},
        "frame_rates": {"layers": layer_rate, "mfcc": reader.frame_rate if reader is not None else None},
        "frame_rate_note": "each feature is scored at its own frame rate: the phone at each frame centre of the "
                           "alignment (model frames at the model rate, MFCC frames at the MFCC rate)",
        "layer_framing": layer_framing,
        "sample_frac": sample_frac, "max_frames": max_frames, "sample_size": n,
        "max_utts": max_utts, "subset_frac": subset_frac,
        "seed": seed, "niter": opts.niter, "nredo": opts.nredo, "init": opts.init, "dtype": dtype,
        "phones": phones,
        "created_by": f"speechssl {__version__}",
    }
    if random_result is not None:
        result["best_ratio_to_random_best"] = _ratio(best_row["pnmi"], random_result["best_pnmi"])
    if reader is not None:
        result["mfcc"] = {**entry("mfcc"), "feats": str(mfcc), "kind": _spectral_name(reader.meta),
                          "frame_rate": reader.frame_rate, "dim": reader.dim}
    for name, cov in coverage.items():
        if cov.summary():
            report(f"{name}: {cov.summary()}")
    for i, r in enumerate(rows):
        line = (f"layer {r['layer']:>2}: PNMI {r['pnmi']:.4f}  phone purity {r['phone_purity']:.4f}  "
                f"cluster purity {r['cluster_purity']:.4f}")
        if random_result is not None:
            line += f"  random PNMI {random_result['layers'][i]['pnmi']:.4f} (ratio {_fmt_ratio(r['ratio_to_random'])})"
        report(line)
    if result["mfcc"]:
        mm = result["mfcc"]
        report(f"{mm['kind']} units: PNMI {mm['pnmi']:.4f}  phone purity {mm['phone_purity']:.4f}  "
               f"cluster purity {mm['cluster_purity']:.4f}  ({mm['frame_rate']:g} Hz)")
    if random_result is not None:
        report(f"best layer {best}: PNMI {best_row['pnmi']:.4f} vs random-init best {random_result['best_pnmi']:.4f} "
               f"({_fmt_ratio(result['best_ratio_to_random_best'])} x)")
    else:
        report(f"best layer by PNMI: {best}")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_layers(result, out / "layers.png")
        atomic_write_text(out / "layers.json", json.dumps(result, indent=1) + "\n")  # last: the commit marker
        report(f"wrote {out / 'layers.json'} and {out / 'layers.png'}")
    return result


def _spectral_name(meta: dict[str, Any]) -> str:
    """``"mfcc"``, ``"fbank+cmvn(meanvar)"``: the kind of a spectral feature store and its per-utterance CMVN."""
    kind = str(meta.get("kind") or "features")
    cmvn = ((meta.get("source") or {}).get("options") or {}).get("cmvn")
    return f"{kind}+cmvn({cmvn})" if cmvn else kind


def plot_layers(result: dict[str, Any], path: str | os.PathLike) -> None:
    """PNG: PNMI (and purities, lighter) by layer; the random-init model's PNMI by layer as a second line (grey,
    dashed) and MFCC units at the same k as a horizontal line: the baselines the trained curve is read against."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["layers"]
    xs = [r["layer"] for r in rows]
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, [r["pnmi"] for r in rows], "o-", color="C0", label="PNMI")
    ax.plot(xs, [r["phone_purity"] for r in rows], ".--", color="C1", alpha=0.6, label="phone purity")
    ax.plot(xs, [r["cluster_purity"] for r in rows], ".:", color="C2", alpha=0.6, label="cluster purity")
    rnd = result.get("random_init")
    if rnd:
        ax.plot([r["layer"] for r in rnd["layers"]], [r["pnmi"] for r in rnd["layers"]], "s--", color="0.45",
                markersize=4, label="random init PNMI (same config, untrained)")
    m = result.get("mfcc")
    if m:
        ax.axhline(m["pnmi"], color="C3", linestyle="-", label=f"{m.get('kind') or 'MFCC'} units PNMI ({m['pnmi']:.3f}, {m['frame_rate']:g} Hz)")
    best = result["best_layer"]
    ax.annotate(f"best {best}", (best, max(r["pnmi"] for r in rows)), textcoords="offset points", xytext=(0, 8),
                ha="center", fontsize=8)
    ax.set_xlabel("hidden layer (0 = transformer input)")
    ax.set_ylabel("score")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"k-means units by layer, k={result['k']}, {result['utterances']} utterances\n"
                 f"{Path(result['checkpoint']).name} ({result['checkpoint_sha1'][:10]})", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")

