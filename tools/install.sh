#!/usr/bin/env bash
# Create .venv and install speechssl with pinned dependencies.
# Idempotent: a second run with unchanged pyproject.toml/install.sh returns in well under a second.
#   TORCH_SPEC   torch requirement installed first (default: torch==2.13.0, the CPU build on these machines)
#   EXTRAS       extras to install (default: dev,synth,interop,asr)
#   VENV         virtualenv path (default: .venv in the repository root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VENV=${VENV:-$root/.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,synth,interop,asr}
PYTHON=${PYTHON:-python3}

stamp="$VENV/.speechssl-installed"
want=$(cat pyproject.toml tools/install.sh tools/constraints.txt | sha1sum | cut -d' ' -f1)-$TORCH_SPEC-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
echo "[install] $TORCH_SPEC"
"${pip[@]}" "$TORCH_SPEC"
echo "[install] speechssl[$EXTRAS] (constraints: tools/constraints.txt)"
"${pip[@]}" -c tools/constraints.txt -e ".[$EXTRAS]"
# s3prl is the reference for interoperability tests; it requires torchaudio, which does not import beside this
# torch, so it is installed without its dependencies (its vendored fairseq HuBERT needs only torch and numpy).
if [[ ",$EXTRAS," == *",dev,"* ]]; then
  "${pip[@]}" --no-deps -c tools/constraints.txt s3prl
fi
# transformers imports torchaudio when present; a torchaudio that does not match torch breaks it.
if "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torchaudio') else 1)"; then
  if ! "$VENV/bin/python" -c "import torchaudio" >/dev/null 2>&1; then
    echo "[install] removing a torchaudio that does not import beside this torch"
    "$VENV/bin/python" -m pip uninstall -y -q torchaudio
  fi
fi
echo "$want" > "$stamp"
echo "[install] done: $("$VENV/bin/python" -c 'import torch, speechssl; print("torch", torch.__version__, "speechssl", speechssl.__version__)')"
