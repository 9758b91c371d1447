#!/usr/bin/env bash
# Prepare iemocap for SUPERB (see ../README.md: download, layout, outputs). All logic is in Python:
#   speechssl/superb/corpora/iemocap.py   (--help lists the options)
# Usage: $0 --corpus DIR --out DIR [options]
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
exec "$python" -m speechssl superb prepare iemocap "$@"
