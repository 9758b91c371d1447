"""speechssl.data: Kaldi data dirs (read/validate/write/fix), durations, lhotse bridge, and the `data` CLI.

Kaldi's own ``utils/validate_data_dir.sh`` is the reference for what a valid data dir is. Its scripts are not
vendored into this repository: the comparison tests take them from ``$KALDI_UTILS``, ``tests/kaldi_utils/`` or the
repository's sibling ``../shared/kaldi_utils/`` (the first that holds ``utils/validate_data_dir.sh``,
``utils/validate_text.pl`` and ``utils/spk2utt_to_utt2spk.pl``); only if none does are they skipped, with the
places searched as the reason, after the checks of our own validator in the same test have run. Under ``CI=true``
that skip fails the run (tests/conftest.py): CI has ``../shared/kaldi_utils``, so no comparison vanishes. They run
from an executable copy in a temporary folder (the tree may be read-only, without exec bits) and need ``bash``,
``perl`` with Encode (Debian: ``perl``), ``awk``, ``grep``, ``sort``, ``cmp``, ``diff`` and ``locale``.
"""

from __future__ import annotations

import atexit
import filecmp
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechssl.cli import main
from speechssl.data import (
    DataDir,
    DataDirError,
    fix_data_dir,
    load_utterance,
    read_data_dir,
    subset_data_dir,
    validate_data_dir,
    write_data_dir,
)
from speechssl.data import kaldi as kaldi_mod
from speechssl.data.durations import compute_durations, filter_data_dir
from speechssl.data.lhotse_io import data_dir_to_lhotse, lhotse_to_data_dir

SR = 16000


_KALDI_SCRIPTS = ("validate_data_dir.sh", "validate_text.pl", "spk2utt_to_utt2spk.pl")
_KALDI_CANDIDATES = (
    ("$KALDI_UTILS", os.environ.get("KALDI_UTILS")),
    ("tests/kaldi_utils", Path(__file__).resolve().parent / "kaldi_utils"),
    ("../shared/kaldi_utils", Path(__file__).resolve().parents[2] / "shared" / "kaldi_utils"),
)


def _kaldi_utils() -> Path | None:
    for _, cand in _KALDI_CANDIDATES:
        if cand and all((Path(cand) / "utils" / f).is_file() for f in _KALDI_SCRIPTS):
            return Path(cand)
    return None


KALDI = _kaldi_utils()
KALDI_MISSING = ("Kaldi utils/{" + ",".join(_KALDI_SCRIPTS) + "} not found in any of: "
                 + "; ".join(f"{what} ({where or 'unset'})" for what, where in _KALDI_CANDIDATES)
                 + " (see tests/kaldi_utils/README.md)")
needs_kaldi = pytest.mark.skipif(KALDI is None, reason=KALDI_MISSING)  # a skip, a failure under CI=true

# Kaldi's validate_data_dir.sh:128-136 rejects text lines with characters that are neither [:print:] nor [:space:]
# in a UTF-8 locale, so that non-ASCII letters pass. It picks that locale with `locale -a | grep "C.UTF-8"`
# (line 129), else en_US.UTF-8. glibc lists the C.UTF-8 locale as "C.utf8" (kaldi-asr/kaldi#4934, still open),
# so where en_US.UTF-8 is not installed (Debian/Ubuntu images) grep runs in the C locale and every non-ASCII
# byte counts as non-printable. There we hand the script a `locale` whose `-a` also lists "C.UTF-8", the
# locale its rule was written for; the rule itself (and the script) stay as they are.
_LOCALE_SHIM = """#!/bin/sh
if [ "$1" = "-a" ]; then {real} -a; echo C.UTF-8; exit 0; fi
exec {real} "$@"
"""


def _locale_usable(name: str) -> bool:
    out = subprocess.run(["locale", "charmap"], capture_output=True, text=True, env={**os.environ, "LC_ALL": name})
    return out.returncode == 0 and out.stdout.strip() == "UTF-8" and not out.stderr


@functools.cache
def _kaldi_runner() -> tuple[Path, dict[str, str]]:
    """(cwd, env) to run the Kaldi scripts from: an executable copy of utils/, plus the locale shim if needed."""
    missing = [t for t in ("bash", "perl", "awk", "grep", "sort", "cmp", "diff", "locale") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"Kaldi utils found at {KALDI}, but {', '.join(missing)} not on PATH")
    if subprocess.run(["perl", "-MEncode", "-e", "1"], capture_output=True).returncode != 0:
        pytest.fail("Kaldi's validate_text.pl needs perl's Encode module (Debian: apt-get install perl)")
    root = Path(tempfile.mkdtemp(prefix="kaldi_utils."))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    (root / "utils").mkdir()
    for f in _KALDI_SCRIPTS:  # the script runs utils/*.pl directly (lines 116, 138): they must be executable
        shutil.copyfile(KALDI / "utils" / f, root / "utils" / f)
        os.chmod(root / "utils" / f, 0o755)
    env = {**os.environ, "LC_ALL": "C"}
    listed = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout
    if not re.search(r"C.UTF-8", listed) and not _locale_usable("en_US.UTF-8") and _locale_usable("C.UTF-8"):
        (root / "bin").mkdir()
        (root / "bin" / "locale").write_text(_LOCALE_SHIM.format(real=shutil.which("locale")))
        os.chmod(root / "bin" / "locale", 0o755)
        env["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return root, env


def kaldi_validate(data: Path) -> tuple[bool, str]:
    """Run Kaldi's validate_data_dir.sh --no-feats. Accepted iff it says so (it exits 0 on some errors).
    Without the Kaldi utils the calling test is skipped here (tests/conftest.py fails it under CI=true): call it
    after the test's own checks."""
    if KALDI is None:
        pytest.skip(KALDI_MISSING)
    cwd, env = _kaldi_runner()
    out = subprocess.run(
        ["bash", "utils/validate_data_dir.sh", "--no-feats", str(data.resolve())],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
    )
    ok = out.returncode == 0 and "Successfully validated" in out.stdout
    return ok, out.stdout + out.stderr


# --------------------------------------------------------------------------------------------------------------
# A small corpus: 2 speakers x 3 utterances, ids chosen so that LC_ALL=C order differs from naive orders.

SPEAKERS = ["SpkB", "spk_a"]  # 'S' (0x53) < 's' (0x73): C order puts SpkB first
LENGTHS = [8000, 12000, 4000]


def _ramp(n: int, offset: int) -> np.ndarray:
    return ((np.arange(n) + offset) % 20000 - 10000).astype(np.int16)


@pytest.fixture
def corpus(tmp_path) -> DataDir:
    """Per-utterance WAV files (one played through a pipe), text with non-ASCII, two utt2* extras."""
    wav_scp, utt2spk, text, kw, intent = {}, {}, {}, {}, {}
    for si, spk in enumerate(SPEAKERS):
        for j, n in enumerate(LENGTHS):
            utt = f"{spk}-{j:02d}"
            p = tmp_path / "wav" / f"{utt}.wav"
            p.parent.mkdir(exist_ok=True)
            sf.write(p, _ramp(n, 1000 * si + 100 * j), SR, subtype="PCM_16")
            wav_scp[utt] = f"cat {p} |" if j == 1 else str(p)
            utt2spk[utt] = spk
            text[utt] = f"héllo wörld {j}"
            kw[utt] = ["yes", "no", "stop"][j]
            intent[utt] = f"act_{j} obj {si}"
    return DataDir(wav_scp=wav_scp, utt2spk=utt2spk, text=text, extra={"utt2kw": kw, "utt2intent": intent})


@pytest.fixture
def seg_corpus(tmp_path) -> DataDir:
    """Two 2-s recordings cut into segments (ids not equal to recording ids)."""
    wav_scp, utt2spk, segments, text = {}, {}, {}, {}
    for ri, spk in enumerate(SPEAKERS):
        rec = f"rec{ri}"
        p = tmp_path / "wav" / f"{rec}.wav"
        p.parent.mkdir(exist_ok=True)
        sf.write(p, _ramp(2 * SR, 5000 * ri), SR, subtype="PCM_16")
        wav_scp[rec] = str(p)
        for j, (s, e) in enumerate([(0.0, 0.5), (0.25, 1.25), (1.5, 2.0)]):
            utt = f"{spk}-{rec}-{j}"
            segments[utt] = (rec, s, e)
            utt2spk[utt] = spk
            text[utt] = f"seg {j}"
    return DataDir(wav_scp=wav_scp, utt2spk=utt2spk, text=text, segments=segments)


def _first_fields(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text("utf-8").splitlines()]


# --------------------------------------------------------------------------------------------------------------
# Writing and reading


def test_write_read_roundtrip_and_c_sort_order(corpus, tmp_path):
    out = tmp_path / "data"
    write_data_dir(corpus, out)
    assert read_data_dir(out) == corpus
    files = sorted(p.name for p in out.iterdir())
    assert files == ["spk2utt", "text", "utt2intent", "utt2kw", "utt2spk", "wav.scp"]
    # independent reference for C order: coreutils sort under LC_ALL=C
    for name in files:
        keys = _first_fields(out / name)
        ref = subprocess.run(["sort", "-u"], input="\n".join(keys) + "\n", capture_output=True, text=True,
                             env={**os.environ, "LC_ALL": "C"}).stdout.split()
        assert keys == ref, name
    assert (out / "spk2utt").read_text() == "SpkB SpkB-00 SpkB-01 SpkB-02\nspk_a spk_a-00 spk_a-01 spk_a-02\n"
    assert (out / "utt2intent").read_text().splitlines()[0] == "SpkB-00 act_0 obj 0"


def test_utterances_and_load_utterance(corpus, tmp_path):
    write_data_dir(corpus, tmp_path / "d")
    dd = read_data_dir(tmp_path / "d")
    utts = list(dd.utterances())
    assert [u.utt_id for u in utts] == dd.utt_ids() == sorted(corpus.utt2spk)
    u = utts[1]  # SpkB-01, read through a pipe
    assert u.source.endswith("|") and u.speaker == "SpkB" and u.text == "héllo wörld 1"
    np.testing.assert_array_equal(load_utterance(u), _ramp(12000, 100) / 32768.0)


def test_segments_read_the_right_samples(seg_corpus, tmp_path):
    write_data_dir(seg_corpus, tmp_path / "d")
    dd = read_data_dir(tmp_path / "d")
    assert (tmp_path / "d" / "segments").read_text().splitlines()[1] == "SpkB-rec0-1 rec0 0.25 1.25"
    for utt in dd.utterances():
        full = _ramp(2 * SR, 5000 * int(utt.rec_id[-1])) / 32768.0
        a, b = round(utt.start * SR), round(utt.end * SR)
        np.testing.assert_array_equal(load_utterance(utt), full[a:b])


@needs_kaldi
@pytest.mark.parametrize("fixture", ["corpus", "seg_corpus"])
def test_written_dirs_pass_kaldi_validate(fixture, request, tmp_path):
    dd = request.getfixturevalue(fixture)
    write_data_dir(dd, tmp_path / "d")
    compute_durations(tmp_path / "d", progress=False)
    ok, log = kaldi_validate(tmp_path / "d")
    assert ok, log


# --------------------------------------------------------------------------------------------------------------
# Corruptions: each must be rejected by us (naming file:line) and, where Kaldi checks it, by Kaldi.


def _edit(name: str, fn):
    def apply(d: Path) -> None:
        p = d / name
        p.write_bytes(fn(p.read_bytes()))
    return apply


def _lines(fn):
    """Edit a file as a list of byte lines (without newlines)."""
    return lambda b: b"".join(x + b"\n" for x in fn(b.split(b"\n")[:-1]))


def _swap(i, j):
    def f(lines):
        lines[i], lines[j] = lines[j], lines[i]
        return lines
    return _lines(f)


def _set(i, value: bytes):
    def f(lines):
        lines[i] = value
        return lines
    return _lines(f)


def _drop(i):
    return _lines(lambda lines: lines[:i] + lines[i + 1:])


def _add(name: str, value: bytes):
    """Add file ``name`` giving every utterance of utt2spk ``value``."""
    def apply(d: Path) -> None:
        (d / name).write_bytes(b"".join(u + b" " + value + b"\n" for u in _first_fields_b(d / "utt2spk")))
    return apply


def _first_fields_b(path: Path) -> list[bytes]:
    return [line.split()[0] for line in path.read_bytes().splitlines()]


def _rename_speaker(d: Path) -> None:
    """Speaker 'zz' for SpkB-01: utt2spk stays sorted by utt but not by speaker; spk2utt rebuilt to match."""
    dd = read_data_dir(d, validate=False)
    dd.utt2spk["SpkB-01"] = "zz"
    rows = kaldi_mod._render(dd)
    kaldi_mod._write_lines(d / "utt2spk", rows["utt2spk"])
    kaldi_mod._write_lines(d / "spk2utt", rows["spk2utt"])


# (id, fixture, corruption, substring of our message, does Kaldi's script catch it?)
CORRUPTIONS = [
    ("utt2spk-duplicate", "corpus", _edit("utt2spk", _set(1, b"SpkB-00 SpkB")), "utt2spk:2: duplicate id 'SpkB-00'", True),
    ("utt2spk-unsorted", "corpus", _edit("utt2spk", _swap(0, 1)), "utt2spk:2: not sorted", True),
    ("utt2spk-3-fields", "corpus", _edit("utt2spk", _set(2, b"SpkB-02 SpkB x")), "utt2spk:3: expected 2 fields", True),
    ("utt2spk-empty", "corpus", _edit("utt2spk", lambda b: b""), "utt2spk: empty file", True),
    ("utt2spk-no-final-newline", "corpus", _edit("utt2spk", lambda b: b[:-1]), "utt2spk:6: missing newline", True),
    ("speaker-not-prefix", "corpus", _rename_speaker, "utt2spk:3: utterance 'SpkB-02' of speaker 'SpkB' sorts after 'SpkB-01' of speaker 'zz'", True),
    ("spk2utt-mismatch", "corpus", _edit("spk2utt", _set(0, b"SpkB SpkB-00 SpkB-01")), "spk2utt:2: spk2utt does not expand to utt2spk: expected utterance 'SpkB-02'", True),
    ("spk2utt-wrong-speaker", "corpus", _edit("spk2utt", _set(0, b"SpkB SpkB-00 SpkB-01 SpkB-02 spk_a-00")), "spk2utt:1: utterance 'spk_a-00' listed under speaker 'SpkB'", True),
    ("text-unknown-utt", "corpus", _edit("text", _set(5, b"spk_a-09 hello")), "text:6: utterance 'spk_a-09' is not in utt2spk", True),
    ("text-missing-utt", "corpus", _edit("text", _drop(2)), "text: utterance 'SpkB-02' is missing (it is in", True),
    ("text-crlf", "corpus", _edit("text", lambda b: b.replace(b"\n", b"\r\n")), "text:1: carriage return", True),
    ("text-nbsp", "corpus", _edit("text", _set(0, "SpkB-00 a\u00a0b".encode())), "text:1: disallowed whitespace character U+00A0", True),
    ("text-illegal-symbol", "corpus", _edit("text", _set(3, b"spk_a-00 hello </s>")), "text:4: text contains the reserved symbol '</s>'", True),
    ("text-empty-line", "corpus", _edit("text", lambda b: b.replace(b"\n", b"\n\n", 1)), "text:2: empty line", True),
    ("text-control-char", "corpus", _edit("text", _set(2, b"SpkB-02 bell\x07here")), "text:3: non-printable character U+0007 (control) in the transcript", True),
    ("text-c1-control-in-id", "corpus", _edit("text", _set(0, "SpkB-00\u0080 x".encode())), "text:1: non-printable character U+0080 (control) in the utterance id", True),
    ("text-noncharacter", "corpus", _edit("text", _set(2, "SpkB-02 a\ufffeb".encode())), "text:3: non-printable character U+FFFE (unassigned) in the transcript", True),
    ("text-not-utf8", "corpus", _edit("text", _set(4, b"spk_a-01 caf\xe9")), "text:5: not valid UTF-8 (byte 0xe9 at column 13)", False),
    ("wav-scp-missing-utt", "corpus", _edit("wav.scp", _drop(3)), "wav.scp: utterance 'spk_a-00' is missing", True),
    ("wav-scp-tilde", "corpus", _edit("wav.scp", _set(0, b"SpkB-00 ~/a.wav")), "wav.scp:1: path starts with '~'", True),
    ("extra-missing-utt", "corpus", _edit("utt2kw", _drop(0)), "utt2kw: utterance 'SpkB-00' is missing", False),
    ("utt2uniq-missing-utt", "corpus", lambda d: (_add("utt2uniq", b"u")(d), _edit("utt2uniq", _drop(0))(d)), "utt2uniq: utterance 'SpkB-00' is missing", True),
    ("utt2num-frames-fraction", "corpus", _add("utt2num_frames", b"12.5"), "utt2num_frames:1: frame count 12.5 is not a positive integer", True),
    ("utt2num-frames-3-fields", "corpus", _add("utt2num_frames", b"12 13"), "utt2num_frames:1: expected 2 fields", True),
    ("utt2warp-out-of-range", "corpus", _add("utt2warp", b"1.5"), "utt2warp:1: warp factor 1.5 is not in (0.5, 1.5)", True),
    ("segments-end-before-start", "seg_corpus", _edit("segments", _set(1, b"SpkB-rec0-1 rec0 1.25 0.25")), "segments:2: segment end 0.25 is not after start 1.25", True),
    ("segments-3-fields", "seg_corpus", _edit("segments", _set(0, b"SpkB-rec0-0 rec0 0.0")), "segments:1: expected 4 fields", True),
    ("segments-not-a-number", "seg_corpus", _edit("segments", _set(0, b"SpkB-rec0-0 rec0 0.0 abc")), "segments:1: segment end 'abc' is not a number", None),
    ("segments-unknown-recording", "seg_corpus", _edit("segments", _set(0, b"SpkB-rec0-0 rec9 0 0.5")), "segments:1: recording 'rec9' of utterance 'SpkB-rec0-0' is not in wav.scp", True),
    ("wav-scp-unused-recording", "seg_corpus", _edit("wav.scp", lambda b: b + b"rec2 /x.wav\n"), "wav.scp:3: recording 'rec2' is not used by any segment", True),
    ("utt2dur-zero", "seg_corpus", _edit("utt2dur", _set(0, b"SpkB-rec0-0 0")), "utt2dur:1: duration 0 is not > 0", True),
    ("reco2dur-unknown", "seg_corpus", _edit("reco2dur", _set(1, b"rec5 2")), "reco2dur:2: recording 'rec5' is not in wav.scp", True),
]


@pytest.mark.parametrize("name, fixture, corrupt, message, kaldi_catches", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corruption_is_rejected(name, fixture, corrupt, message, kaldi_catches, request, tmp_path):
    d = tmp_path / "d"
    write_data_dir(request.getfixturevalue(fixture), d)
    compute_durations(d, progress=False)
    validate_data_dir(d)  # valid before
    if KALDI is not None:  # the unbroken dir passes Kaldi too (without Kaldi: skipped at the end, below)
        assert kaldi_validate(d)[0]
    corrupt(d)
    with pytest.raises(DataDirError) as e:
        validate_data_dir(d)
    assert message in str(e.value)
    assert str(d) in str(e.value)
    ok, log = kaldi_validate(d)  # without the Kaldi utils: a skip here, after our checks (a failure under CI)
    if kaldi_catches is not None:
        assert ok is not kaldi_catches, log


def test_kaldi_accepts_what_we_accept(corpus, tmp_path):
    """Printable non-ASCII (CJK, Cf format and Co private-use characters) and well-formed utt2num_frames/utt2warp."""
    d = tmp_path / "d"
    text = {**corpus.text, "SpkB-01": "日本語 zero\u200bwidth soft\u00adhyphen \ue000 ünï"}
    write_data_dir(replace(corpus, text=text), d)
    _add("utt2num_frames", b"12")(d)
    _add("utt2warp", b"1.05")(d)
    validate_data_dir(d)
    assert read_data_dir(d).text["SpkB-01"] == text["SpkB-01"]
    ok, log = kaldi_validate(d)
    assert ok, log


def test_missing_required_files(corpus, tmp_path):
    d = tmp_path / "d"
    write_data_dir(corpus, d)
    (d / "spk2utt").unlink()
    with pytest.raises(DataDirError, match="no spk2utt file"):
        validate_data_dir(d)
    (d / "wav.scp").unlink()
    with pytest.raises(DataDirError, match="no wav.scp file"):
        read_data_dir(d)
    with pytest.raises(DataDirError, match="no such data directory"):
        read_data_dir(tmp_path / "nope")


# --------------------------------------------------------------------------------------------------------------
# Atomic writes and in-memory validation


def test_write_rejects_invalid_datadir_and_leaves_nothing(corpus, tmp_path):
    bad = replace(corpus, utt2spk={**corpus.utt2spk, "SpkB-01": "zz"})
    with pytest.raises(DataDirError, match="out/utt2spk:3: utterance 'SpkB-02' of speaker 'SpkB' sorts after 'SpkB-01' of speaker 'zz'"):
        write_data_dir(bad, tmp_path / "out")
    bad2 = replace(corpus, text={**corpus.text, "SpkB-00": "two\nlines"})
    with pytest.raises(DataDirError, match="text:1: transcript"):
        write_data_dir(bad2, tmp_path / "out")
    bad3 = replace(corpus, utt2spk={**corpus.utt2spk, "spk_a 03": "spk_a"})
    with pytest.raises(DataDirError, match="contains whitespace"):
        write_data_dir(bad3, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wav"]


def test_write_failure_midway_leaves_no_dir(corpus, tmp_path, monkeypatch):
    calls = []

    def flaky(path, rows):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError("disk full")
        real(path, rows)

    real = kaldi_mod._write_lines
    monkeypatch.setattr(kaldi_mod, "_write_lines", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_data_dir(corpus, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wav"]
    # an existing dir is left untouched
    monkeypatch.undo()
    write_data_dir(corpus, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls.clear()
    monkeypatch.setattr(kaldi_mod, "_write_lines", flaky)
    with pytest.raises(OSError):
        write_data_dir(corpus.subset(["SpkB-00", "spk_a-00"]), tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wav"]


def test_rewrite_removes_stale_kaldi_files_keeps_others(seg_corpus, tmp_path):
    d = tmp_path / "d"
    write_data_dir(seg_corpus, d)
    compute_durations(d, progress=False)
    (d / "phones.ctm").write_text("x 1 0 1 a\n")
    dd = read_data_dir(d)
    write_data_dir(replace(dd, utt2dur=None, reco2dur=None), d)
    assert not (d / "utt2dur").exists() and not (d / "reco2dur").exists()
    assert (d / "phones.ctm").exists()
    validate_data_dir(d)


# --------------------------------------------------------------------------------------------------------------
# fix_data_dir


def test_fix_data_dir(corpus, tmp_path):
    d = tmp_path / "d"
    write_data_dir(corpus, d)
    good = {p.name: p.read_bytes() for p in d.iterdir()}
    lines = lambda n: (d / n).read_bytes().split(b"\n")[:-1]  # noqa: E731
    u2s = lines("utt2spk")
    (d / "utt2spk").write_bytes(b"\n".join(u2s[::-1] + [u2s[0]]) + b"\n")  # reversed + a duplicate
    (d / "spk2utt").write_bytes(b"junk\n")  # ignored: rebuilt from utt2spk
    t = lines("text")
    (d / "text").write_bytes(b"\n".join(t[:2] + t[3:]) + b"\n")  # SpkB-02 has no text
    (d / "wav.scp").write_bytes((d / "wav.scp").read_bytes() + b"zzz-unused /nowhere.wav\n")
    with pytest.raises(DataDirError):
        validate_data_dir(d)
    report = fix_data_dir(d)
    validate_data_dir(d)
    assert report["utterances_before"] == 6 and report["utterances_kept"] == 5
    assert report["dropped"] == {"text": 1, "wav.scp": 0} or report["dropped"] == {"text": 1}
    assert report["duplicates_removed"] == {"utt2spk": 1}
    assert "utt2spk" in report["resorted"]
    assert read_data_dir(d) == corpus.subset([u for u in corpus.utt2spk if u != "SpkB-02"])
    assert (d / ".backup" / "spk2utt").read_bytes() == b"junk\n"
    assert good["utt2kw"] != (d / "utt2kw").read_bytes()  # extras filtered too
    assert kaldi_validate(d)[0]


def test_fix_refuses_malformed_lines_and_empty_result(corpus, tmp_path):
    d = tmp_path / "d"
    write_data_dir(corpus, d)
    (d / "text").write_bytes(b"\xff\xfe\n")
    with pytest.raises(DataDirError, match=r"text:1: not valid UTF-8"):
        fix_data_dir(d)
    (d / "text").write_bytes(b"nobody hi\n")
    with pytest.raises(DataDirError, match="no utterances remain"):
        fix_data_dir(d)


# --------------------------------------------------------------------------------------------------------------
# Durations, filtering, subsets


def test_durations_from_headers_pipes_and_segments(corpus, seg_corpus, tmp_path):
    write_data_dir(corpus, tmp_path / "a")
    dd = compute_durations(tmp_path / "a", nj=2, progress=False)
    assert dd.utt2dur == {u: LENGTHS[int(u[-1])] / SR for u in corpus.utt2spk}
    assert (tmp_path / "a" / "utt2dur").read_text().splitlines()[0] == "SpkB-00 0.5"
    write_data_dir(replace(seg_corpus, segments={**seg_corpus.segments, "SpkB-rec0-2": ("rec0", 1.5, 2.3)}), tmp_path / "b")
    dd = compute_durations(tmp_path / "b", progress=False)
    assert dd.reco2dur == {"rec0": 2.0, "rec1": 2.0}
    assert dd.utt2dur["SpkB-rec0-1"] == pytest.approx(1.0)
    assert dd.utt2dur["SpkB-rec0-2"] == pytest.approx(0.5)  # truncated at the end of the recording


def test_filter_and_subset(corpus, tmp_path):
    write_data_dir(corpus, tmp_path / "a")
    kept, dropped = filter_data_dir(tmp_path / "a", tmp_path / "f", min_duration=0.3, max_duration=0.6, progress=False)
    assert (kept, dropped) == (2, 4)
    assert read_data_dir(tmp_path / "f").utt_ids() == ["SpkB-00", "spk_a-00"]
    assert subset_data_dir(tmp_path / "a", tmp_path / "s", first=4) == 4
    assert read_data_dir(tmp_path / "s").utt_ids() == ["SpkB-00", "SpkB-01", "SpkB-02", "spk_a-00"]
    (tmp_path / "list").write_text("spk_a-02\nnot-there\n")
    with pytest.raises(DataDirError, match=r"list:2: utterance 'not-there' is not in"):
        subset_data_dir(tmp_path / "a", tmp_path / "s2", utt_list=tmp_path / "list")
    assert not (tmp_path / "s2").exists()


# --------------------------------------------------------------------------------------------------------------
# lhotse bridge


@pytest.mark.parametrize("fixture", ["corpus", "seg_corpus"])
@pytest.mark.parametrize("with_durations", [True, False])
def test_lhotse_roundtrip_is_identical(fixture, with_durations, request, tmp_path):
    src, man, back, back_cuts = (tmp_path / n for n in ("src", "man", "back", "back_cuts"))
    write_data_dir(request.getfixturevalue(fixture), src)
    if with_durations:
        compute_durations(src, progress=False)
    cuts = data_dir_to_lhotse(src, man, progress=False)
    assert sorted(p.name for p in man.iterdir()) == ["cuts.jsonl.gz", "recordings.jsonl.gz", "supervisions.jsonl.gz"]
    lhotse_to_data_dir(man, back, durations=with_durations)
    lhotse_to_data_dir(man / "cuts.jsonl.gz", back_cuts, durations=with_durations)
    for out in (back, back_cuts):
        names = sorted(p.name for p in src.iterdir())
        assert sorted(p.name for p in out.iterdir()) == names
        match, mismatch, errors = filecmp.cmpfiles(src, out, names, shallow=False)
        assert mismatch == [] and errors == []
    # the manifests carry what lhotse users need, and audio loads identically through lhotse
    cut = cuts[0]
    dd = read_data_dir(src)
    utt = dd.utterance(cut.id)
    np.testing.assert_allclose(cut.load_audio()[0], load_utterance(utt), atol=1e-7)
    sup = cut.supervisions[0]
    assert sup.speaker == dd.utt2spk[cut.id] and sup.text == dd.text[cut.id]
    if fixture == "corpus":
        assert sup.custom == {"intent": dd.extra["utt2intent"][cut.id], "kw": dd.extra["utt2kw"][cut.id]}
        assert cuts["SpkB-01"].recording.sources[0].type == "command"


def test_lhotse_rejects_supervision_without_speaker(corpus, tmp_path):
    from lhotse.utils import fastcopy

    write_data_dir(corpus, tmp_path / "src")
    cuts = data_dir_to_lhotse(tmp_path / "src", tmp_path / "man", progress=False)
    c = cuts[0]

    def drop_speaker(x):
        return fastcopy(x, supervisions=[fastcopy(x.supervisions[0], speaker=None)]) if x.id == c.id else x

    broken = cuts.map(drop_speaker)
    with pytest.raises(DataDirError, match=f"supervision '{c.id}': no speaker"):
        lhotse_to_data_dir(broken, tmp_path / "back")
    assert not (tmp_path / "back").exists()


# --------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_verbs(corpus, tmp_path, capsys):
    d = tmp_path / "d"
    write_data_dir(corpus, d)
    assert main(["data", "validate", str(d)]) == 0
    assert "OK: 6 utterances, 2 speakers" in capsys.readouterr().out
    assert main(["data", "durations", str(d), "--nj", "2"]) == 0
    assert main(["data", "to-lhotse", str(d), str(tmp_path / "m")]) == 0
    assert main(["data", "from-lhotse", str(tmp_path / "m"), str(tmp_path / "b")]) == 0
    assert filecmp.cmpfiles(d, tmp_path / "b", [p.name for p in d.iterdir()], shallow=False)[1] == []
    assert main(["data", "filter", str(d), str(tmp_path / "f"), "--max-duration", "0.5"]) == 0
    assert len(read_data_dir(tmp_path / "f")) == 4
    assert main(["data", "subset", str(d), str(tmp_path / "s"), "--first", "2"]) == 0
    shutil.copy(d / "utt2spk", d / "text")  # text now has speakers as transcripts: still valid
    (d / "text").write_bytes((d / "text").read_bytes()[:-1])
    capsys.readouterr()
    assert main(["data", "validate", str(d)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"speechssl data: error: {d}/text:6: missing newline at end of file"
    assert main(["data", "fix", str(d)]) == 1  # fix does not guess at malformed files
    (d / "text").write_bytes((d / "text").read_bytes() + b"\n")
    assert main(["data", "fix", str(d)]) == 0
    assert "kept 6 of 6 utterances" in capsys.readouterr().out
    assert main(["data", "validate", str(tmp_path / "missing")]) == 1
    assert "no such data directory" in capsys.readouterr().err
