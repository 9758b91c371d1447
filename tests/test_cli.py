import subprocess
import sys

from speechssl.cli import build_parser, main


def test_every_group_has_help():
    parser = build_parser()
    groups = parser._subparsers._group_actions[0].choices
    assert {"data", "features", "kmeans", "units"} <= set(groups)
    for name in groups:
        out = subprocess.run([sys.executable, "-m", "speechssl", name, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "usage: speechssl" in out.stdout


# ----------------------------------------------------------------------------------------- errors that help


def _bad_data_dir(tmp_path):
    """A data dir whose wav.scp lists one utterance id twice (line 2)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "wav.scp").write_text("u1 /a.wav\nu1 /b.wav\n")
    (d / "utt2spk").write_text("u1 s1\n")
    (d / "spk2utt").write_text("s1 u1\n")
    return d


def test_user_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "speechssl", "data", "validate", str(_bad_data_dir(tmp_path))],
                         capture_output=True, text=True)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("speechssl data: error: ") and "wav.scp:2" in lines[0] and "u1" in lines[0]
    assert "Traceback" not in out.stderr


def test_user_error_with_verbose_shows_traceback(tmp_path, capsys):
    assert main(["-v", "data", "validate", str(_bad_data_dir(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DataDirError" in err
    assert err.strip().splitlines()[-1].startswith("speechssl data: error: ")


def test_internal_error_shows_traceback(tmp_path, monkeypatch, capsys):
    # a bug deep in a verb: a ValueError that is not a UserError must not pass for bad input
    import speechssl.data.kaldi as kaldi

    def broken(*args, **kwargs):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(kaldi, "read_data_dir", broken)
    assert main(["data", "validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "in broken" in err  # the frame where it happened
    last = err.strip().splitlines()[-1]
    assert last.startswith("speechssl data: internal error (ValueError: internal invariant broken)")


def test_every_error_type_of_ours_is_a_user_error():
    """Each room's error type is what the CLI prints as one line: a new one that is not a UserError would print a
    traceback for bad input."""
    import importlib
    import inspect
    import pkgutil

    import speechssl
    from speechssl.errors import UserError

    found = {}
    for m in pkgutil.walk_packages(speechssl.__path__, "speechssl."):
        if m.name == "speechssl.__main__":
            continue
        mod = importlib.import_module(m.name)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == m.name:
                found[f"{m.name}.{name}"] = obj
    assert {"speechssl.audio.AudioError", "speechssl.data.kaldi.DataDirError", "speechssl.config.ConfigError",
            "speechssl.features.store.FeatureStoreError", "speechssl.units.labels.LabelError",
            "speechssl.models.checkpoint.CheckpointError"} <= set(found)
    # TrainingAborted: the run diverged (its own exit code 3), not bad input
    not_user = {k for k, v in found.items() if not issubclass(v, UserError)} - {"speechssl.train.trainer.TrainingAborted"}
    assert not not_user, f"error types that the CLI would print as internal errors: {sorted(not_user)}"
