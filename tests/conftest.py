"""Suite-wide rules (issue 29): no reference check vanishes in CI, and no test depends on order or thread counts.

Skips under CI
    With ``CI`` set to ``true`` (``.ci/run`` runs under it; so may a developer: ``CI=true make test``) every skip
    fails the run, a module's skip at collection included, except that of a test marked ``@pytest.mark.gpu`` on
    a machine without CUDA. A missing dev dependency (an ``importorskip``), missing Kaldi utils
    (``tests/test_data.py``) or any other skip is a failure there, reported with its reason. Outside CI a skip
    stays a skip, and its reason is printed (``-rfEs`` in pyproject's addopts).

Threads and RNG, per test
    Every test runs with torch and faiss pinned to one thread (``@pytest.mark.threads(n)`` asks for n), set by an
    autouse fixture and restored after it; the process starts at one thread too (``pytest_configure``), so
    collection and module/session fixtures run at one thread whatever ran before. The fixture also seeds torch's,
    numpy's and ``random``'s global generators from the test's node id, so a test sees the same global RNG state
    in any order (pytest-randomly, when active, reseeds numpy and ``random`` again with its own seed at the call).
    Test modules do not call ``torch.set_num_threads`` or ``faiss.omp_set_num_threads`` at import.
"""

from __future__ import annotations

import os
import random
import zlib

import faiss
import numpy as np
import pytest
import torch

GPU_SKIP = "needs a CUDA GPU (the only skip allowed under CI=true)"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config):
    config.addinivalue_line("markers", f"gpu: runs only with CUDA; skipped without it, {GPU_SKIP}")
    config.addinivalue_line("markers", "threads(n): torch and faiss use n threads in this test (default 1)")
    config._speechssl_threads = (torch.get_num_threads(), faiss.omp_get_max_threads())
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def pytest_unconfigure(config):
    saved = getattr(config, "_speechssl_threads", None)
    if saved:
        torch.set_num_threads(saved[0])
        faiss.omp_set_num_threads(saved[1])


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(pytest.mark.skip(reason=GPU_SKIP))


def _skip_reason(longrepr) -> str:
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _ci_failure(what: str, reason: str) -> str:
    return f"CI=true fails this skip of {what} (only @pytest.mark.gpu tests may skip): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not in_ci() or not rep.skipped or hasattr(rep, "wasxfail"):
        return
    reason = _skip_reason(rep.longrepr)
    if item.get_closest_marker("gpu") is not None and reason == GPU_SKIP:
        return
    rep.outcome = "failed"
    rep.longrepr = _ci_failure(item.nodeid, reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if in_ci() and rep.outcome == "skipped":
        rep.outcome = "failed"
        rep.longrepr = _ci_failure(f"{collector.nodeid or collector.name} (at collection)", _skip_reason(rep.longrepr))


@pytest.fixture(autouse=True)
def _isolated(request):
    """One thread for torch and faiss (or the test's ``threads`` marker), global RNGs seeded from the node id."""
    marker = request.node.get_closest_marker("threads")
    n = int(marker.args[0]) if marker is not None else 1
    before = (torch.get_num_threads(), faiss.omp_get_max_threads())
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    yield n
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])
