#!/usr/bin/env bash
# Mutation testing of the core (masking, pretraining loss and head, label-rate mapping, PNMI, SUPERB metrics,
# greedy CTC decoding, sharding) with mutmut 3; `make mutation` runs it. Not part of CI. See README.md here.
#
#   tools/mutation/run.sh [--rev REV] [--only LABEL] [--max-children N] [--work DIR]
#
#   --rev REV         measure the sources and tests of commit REV (with this tree's [tool.mutmut] and targets)
#                     instead of the working tree: the "before" score of README.md is `--rev <commit>`
#   --only LABEL      one module of targets.txt (masking, loss+head, label-rate, pnmi, superb-metrics, ctc-greedy,
#                     sharding); default all
#   --max-children N  parallel mutant runs (default 2: the 2-core machines of this project)
#   --work DIR        scratch copy of the tree (default .mutation/work; git-ignored; emptied first)
#
# The tree is copied to the scratch dir (tracked and untracked-but-not-ignored files, or `git archive REV`), so
# mutmut's mutants/ never touches the working tree. Prints the per-module table of score.py and writes it to
# DIR/score.json; the full list of results: `cd DIR && ../../.venv/bin/mutmut results --all true`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
VENV=${VENV:-$root/.venv}
rev="" only="" children=2 work="$root/.mutation/work"
while [ $# -gt 0 ]; do
  case "$1" in
    --rev) rev=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --max-children) children=$2; shift 2 ;;
    --work) work=$(realpath -m "$2"); shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "$0: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done
[ -x "$VENV/bin/mutmut" ] || { echo "$0: no $VENV/bin/mutmut: run 'make install' (the dev extra pins mutmut)" >&2; exit 1; }

start=$(date +%s)
rm -rf "$work"
mkdir -p "$work"
if [ -n "$rev" ]; then
  git archive "$rev" | tar -x -C "$work"
  cp pyproject.toml "$work/pyproject.toml"   # this tree's [tool.mutmut]
  mkdir -p "$work/tools" && rm -rf "$work/tools/mutation" && cp -r tools/mutation "$work/tools/"
  echo "[mutation] sources and tests of $(git rev-parse --short "$rev") in $work"
else
  git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -x -C "$work"
  echo "[mutation] working tree ($(git rev-parse --short HEAD) + changes) in $work"
fi
cd "$work"
"$VENV/bin/python" tools/mutation/score.py prepare
mapfile -t globs < <("$VENV/bin/python" tools/mutation/score.py globs)
if [ -n "$only" ]; then
  mapfile -t globs < <(awk -F'\t' -v m="$only" '!/^#/ && $1 == m {print $2}' tools/mutation/targets.txt)
  [ ${#globs[@]} -gt 0 ] || { echo "$0: --only $only: no such module in targets.txt" >&2; exit 1; }
fi
# one thread per test process: the children run side by side on few cores
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0
"$VENV/bin/mutmut" run --max-children "$children" "${globs[@]}" > mutmut.log 2>&1 || {
  echo "[mutation] mutmut run failed; the end of $work/mutmut.log:" >&2; tail -30 mutmut.log >&2; exit 1; }
"$VENV/bin/python" tools/mutation/score.py report --json score.json
echo "[mutation] $(( $(date +%s) - start )) s on $(lscpu | sed -n 's/^Model name: *//p' | head -1), $children children"
