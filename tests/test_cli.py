import subprocess
import sys

from speechssl.cli import build_parser


def test_every_group_has_help():
    parser = build_parser()
    groups = parser._subparsers._group_actions[0].choices
    assert {"data", "features", "kmeans", "units"} <= set(groups)
    for name in groups:
        out = subprocess.run([sys.executable, "-m", "speechssl", name, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "usage: speechssl" in out.stdout
