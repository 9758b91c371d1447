"""tests/conftest.py itself (issue 29): under ``CI=true`` a skip fails the run, the GPU test's alone excepted, and
outside CI the skip's reason is printed; a missing reference dependency fails even outside CI; missing Kaldi utils
skip the comparisons of tests/test_data.py outside CI and fail them under it; threads and global RNGs are set per
test, whatever ran before.

Each case runs pytest in a subprocess on files written here, with a copy of tests/conftest.py and the repository's
pytest configuration (``-c pyproject.toml``, so its ``addopts`` are the ones under test).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import GPU_SKIP
from test_data import KALDI

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def run_pytest(where: Path, *args: str, ci: bool, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "KALDI_UTILS")}
    base.update(OMP_NUM_THREADS="3", **(env or {}))  # 3: a thread count no test pins, so a leak would show
    if ci:
        base["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(where),
                           "--confcutdir", str(where), "-p", "no:cacheprovider", "-p", "no:randomly", *args],
                          cwd=where, env=base, capture_output=True, text=True, timeout=300)


def write(where: Path, **files: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TESTS / "conftest.py", where / "conftest.py")
    for name, text in files.items():
        (where / f"{name}.py").write_text(textwrap.dedent(text))
    return where


SKIPS = """
    import pytest
    import torch

    def test_passes():
        pass

    def test_reference_missing():
        pytest.skip("the reference xyzzy is not installed")

    @pytest.mark.gpu
    def test_on_gpu():
        assert torch.cuda.is_available()

    def test_pretends_to_be_the_gpu_test():  # the GPU reason, but not the marker: not let through
        pytest.skip("needs a CUDA GPU (the only skip allowed under CI=true)")
"""


def test_a_skip_fails_under_ci_and_prints_its_reason_outside(tmp_path):
    where = write(tmp_path, test_skips=SKIPS)
    ci = run_pytest(where, "test_skips.py", ci=True)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    out = ci.stdout
    assert "FAILED test_skips.py::test_reference_missing" in out and "the reference xyzzy is not installed" in out
    assert "FAILED test_skips.py::test_pretends_to_be_the_gpu_test" in out and "CI=true" in out
    assert "FAILED test_skips.py::test_on_gpu" not in out and "2 failed" in out, out
    if not torch.cuda.is_available():  # the GPU test's skip stays a skip, its reason printed
        assert "1 passed, 1 skipped" in out, out
        assert re.search(rf"SKIPPED \[1\] test_skips.py:\d+: {re.escape(GPU_SKIP)}", out), out

    local = run_pytest(where, "test_skips.py", ci=False)
    assert local.returncode == 0, local.stdout + local.stderr
    # the reasons are printed by the repository's own addopts (-rfEs), -q notwithstanding
    assert "SKIPPED [1] test_skips.py:" in local.stdout and "the reference xyzzy is not installed" in local.stdout
    assert "CI=true fails" not in local.stdout and "3 skipped" in local.stdout


def test_a_missing_dependency_fails(tmp_path):
    """A module-level importorskip (the old way) is a skip locally and a collection error under CI; a plain import
    (the way the suite imports its references now) fails in both."""
    where = write(tmp_path, test_old_way="""
        import sys
        import pytest

        sys.modules["kaldi_native_fbank"] = None  # as if not installed
        knf = pytest.importorskip("kaldi_native_fbank")

        def test_reference():
            pass
    """, test_plain="""
        import sys

        sys.modules["kaldi_native_fbank"] = None  # as if not installed
        import kaldi_native_fbank as knf  # noqa: E402

        def test_reference():
            pass
    """)
    (where / "test_fine.py").write_text("def test_fine():\n    pass\n")  # so that a run with a skip exits 0
    ci = run_pytest(where, "test_old_way.py", "test_fine.py", ci=True)
    assert ci.returncode != 0 and "ERROR test_old_way.py" in ci.stdout, ci.stdout + ci.stderr
    assert "CI=true" in ci.stdout and "kaldi_native_fbank" in ci.stdout
    local = run_pytest(where, "test_old_way.py", "test_fine.py", ci=False)
    assert local.returncode == 0 and "1 skipped" in local.stdout and "kaldi_native_fbank" in local.stdout, local.stdout
    for ci in (True, False):
        plain = run_pytest(where, "test_plain.py", ci=ci)
        assert plain.returncode != 0 and "ModuleNotFoundError" in plain.stdout, plain.stdout + plain.stderr


def test_the_suite_fails_without_its_references(tmp_path):
    """The real test modules, with a reference blocked in sys.modules by a plugin loaded before collection: they fail
    (no CI needed), rather than skip."""
    (tmp_path / "block_refs.py").write_text(
        "import sys\n"
        "for m in ('kaldi_native_fbank', 'transformers', 'sklearn', 'librosa', 's3prl', 'pyannote'):\n"
        "    sys.modules[m] = None\n")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "block_refs", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--continue-on-collection-errors",
         "tests/test_features.py", "tests/test_hf.py", "tests/test_masking.py",
         "tests/test_superb_metrics.py::test_eer_min_dcf_match_s3prl_on_random_trials",
         "tests/test_superb_sd.py::test_der_matches_pyannote_metrics"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}, "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "skipped" not in text, text
    for module in ("test_features.py", "test_hf.py", "test_masking.py"):
        assert f"ERROR tests/{module}" in text, text
    assert "3 failed" in text and "FAILED tests/test_superb_sd.py::test_der_matches_pyannote_metrics" in text, text


KALDI_CASES = ["-k", "test_written_dirs_pass_kaldi_validate or test_kaldi_accepts_what_we_accept"
               " or test_corruption_is_rejected and (segments-3-fields or extra-missing-utt)"]


def test_missing_kaldi_utils_fail_under_ci(tmp_path):
    """tests/test_data.py in a tree without ../shared/kaldi_utils, tests/kaldi_utils or $KALDI_UTILS: its Kaldi
    comparisons skip, naming where they looked, and fail under CI=true."""
    where = write(tmp_path / "repo" / "tests")
    shutil.copyfile(TESTS / "test_data.py", where / "test_data.py")
    assert not (tmp_path / "shared").exists() and not (where / "kaldi_utils").exists()
    ci = run_pytest(where, "test_data.py", *KALDI_CASES, ci=True)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    # the two with @needs_kaldi at setup (errors), the three that check our validator first in the call (failures)
    assert "3 failed" in ci.stdout and "2 errors" in ci.stdout and "CI=true" in ci.stdout, ci.stdout
    assert "../shared/kaldi_utils" in ci.stdout
    local = run_pytest(where, "test_data.py", *KALDI_CASES, ci=False)
    assert local.returncode == 0 and "5 skipped" in local.stdout, local.stdout + local.stderr
    assert "not found in any of: $KALDI_UTILS (unset); tests/kaldi_utils" in local.stdout
    if KALDI is None:
        pytest.skip("no Kaldi utils on this machine for the positive control")  # a failure under CI
    found = run_pytest(where, "test_data.py", *KALDI_CASES, ci=True, env={"KALDI_UTILS": str(KALDI)})
    assert found.returncode == 0 and "5 passed" in found.stdout, found.stdout + found.stderr


def test_threads_and_rng_are_set_per_test(tmp_path):
    """One thread for torch and faiss in every test and at collection (the process has OMP_NUM_THREADS=3), n with
    ``@pytest.mark.threads(n)``, nothing left over from the test before; the global RNGs a test sees do not depend
    on what ran before it."""
    where = write(tmp_path, test_threads="""
        import json
        import os
        import random

        import faiss
        import numpy as np
        import pytest
        import torch

        AT_IMPORT = (torch.get_num_threads(), faiss.omp_get_max_threads())

        def test_1_default():
            assert AT_IMPORT == (1, 1)
            assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
            torch.set_num_threads(3)
            faiss.omp_set_num_threads(3)

        @pytest.mark.threads(2)
        def test_2_marked():
            assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (2, 2)

        def test_3_nothing_left_over():
            assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)

        def draws(name):
            with open(os.environ["DRAWS"], "a") as f:
                f.write(json.dumps([name, torch.rand(1).item(), np.random.rand(), random.random()]) + "\\n")

        def test_4_draws():
            draws("4")

        def test_5_draws():
            draws("5")
    """)
    runs = []
    for order in (["1_default", "2_marked", "3_nothing_left_over", "4_draws", "5_draws"], ["5_draws", "4_draws"]):
        draws = tmp_path / f"draws{len(runs)}.jsonl"
        out = run_pytest(where, *[f"test_threads.py::test_{t}" for t in order], ci=True, env={"DRAWS": str(draws)})
        assert out.returncode == 0, out.stdout + out.stderr
        runs.append(sorted(draws.read_text().splitlines()))
    assert runs[0] == runs[1]
    assert runs[0][0].split(",")[1:] != runs[0][1].split(",")[1:]  # seeded per test, not one seed for all
