"""k-means pseudo-labels: fit on a uniformly drawn, memory-capped sample of frames; label every utterance by id.

fairseq's recipe loads a 10% sample of the features into RAM as one array and fits sklearn MiniBatchKMeans
(k-means++ init, 20 inits, batch 10,000). Here:

* **Sampling** (:mod:`speechssl.units.sampling`) is one streaming pass over the feature store's memory-mapped
  shards (:func:`sample_frames`):
  ``n = min(round(sample_frac * total), max_frames)`` frames, drawn *uniformly without replacement* across
  all shards by sequential hypergeometric splits over chunks of 65,536 frames. The only allocations are the
  ``[n, dim]`` float32 sample and one chunk's index/gather buffers, so memory is known before the pass
  starts (:func:`memory_estimate`, printed by the CLI).
* **Fitting** (:mod:`speechssl.units.fit`) is Lloyd's algorithm in faiss (``faiss.Kmeans``, ``spherical=False``).
  faiss's own initialisation is ``k`` distinct training points drawn at random (it has no k-means++); it re-seeds empty
  clusters by splitting the largest cluster in two (a tiny symmetric perturbation of its centroid). Random
  init gets stuck in poor local minima (two centroids in one mode, one for two modes), so by default each of
  ``nredo`` runs starts from our greedy k-means++ seeding (:func:`kmeanspp_init`, on a subsample, as sklearn
  does) and the run with the lowest objective wins; ``init="random"`` gives faiss's behaviour. faiss would
  silently subsample to ``256 * k`` points; we turn that off (the sample is already the size asked for). On a
  CUDA machine without faiss-gpu the same algorithm runs in torch (:func:`_fit_torch`). :func:`fit_sample` is
  the fit plus the sample's inertia, shared by ``kmeans fit`` and ``units layers`` (options: :class:`FitOptions`).
* **Assignment** (:class:`Assigner`) is batched nearest-centroid search: faiss ``IndexFlatL2`` (k=1) on CPU,
  ``argmin_c ||c||^2 - 2 x.c`` with one torch matmul per batch on GPU.
* **Labels** (:mod:`speechssl.units.label_io`) are written per utterance id, per shard (``shards/R-of-N.km`` +
  header), and merged into one sorted ``text.km`` with ``meta.json`` by whichever process finishes the last
  shard (:func:`merge_label_shards`).
  Which shards a process labels is the one rule of :mod:`speechssl.sharding` (``--rank``, else torchrun, else all).

This module is the one import for all of it: the three stages live in their own modules and are re-exported here.
"""

from __future__ import annotations

from speechssl.units.fit import (  # noqa: F401  (re-exports, private ones included for tests and benchmarks)
    ASSIGN_BATCH,
    FAISS_BATCH,
    FEATURE_KEYS,
    Assigner,
    FitOptions,
    KMeansModel,
    _faiss_has_gpu,
    _fit_torch,
    centroid_hash,
    feature_spec,
    fit_kmeans,
    fit_sample,
    fit_store,
    kmeanspp_init,
    memory_estimate,
    resolve_device,
)
from speechssl.units.label_io import label_store, label_with, merge_label_shards
from speechssl.units.sampling import CHUNK_FRAMES, StreamSampler, sample_frames, sample_indices, sample_size

__all__ = [
    "FitOptions",
    "KMeansModel",
    "Assigner",
    "centroid_hash",
    "sample_size",
    "memory_estimate",
    "sample_frames",
    "sample_indices",
    "StreamSampler",
    "fit_kmeans",
    "fit_sample",
    "kmeanspp_init",
    "fit_store",
    "label_with",
    "label_store",
    "merge_label_shards",
    "resolve_device",
]
