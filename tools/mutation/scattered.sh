#!/usr/bin/env bash
# The mutant of issue 29, by hand: compute_mask_indices keeps each row's masked count but scatters the frames at
# random. Written into a scratch copy of HEAD (the working tree is not touched), it must fail the current masking
# tests; the five masking tests of commit 43174a1 (before issue 29) pass on it.
#   tools/mutation/scattered.sh [SCRATCH_DIR]   (default /tmp/speechssl-scattered)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
py=${VENV:-$root/.venv}/bin/python
dir=${1:-/tmp/speechssl-scattered}
rm -rf "$dir" && mkdir -p "$dir"
git -C "$root" archive HEAD | tar -x -C "$dir"
git -C "$root" show 43174a1:tests/test_masking.py > "$dir/tests/test_masking_43174a1.py"
"$py" - "$dir/speechssl/models/masking.py" <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
old = "    keep = min(len(c) for c in chosen) if chosen else 0"
new = ("    # MUTANT (issue 29): each row keeps its masked count, the frames are scattered over its valid frames\n"
       "    chosen = [torch.randperm(sz, generator=generator)[:len(c)] if sz > 0 else c for c, sz in zip(chosen, lengths)]\n"
       + old)
assert old in src, "compute_mask_indices changed: update the mutant"
open(path, "w").write(src.replace(old, new))
PY
cd "$dir"
echo "== the masking tests of 43174a1 on the mutant (they pass: the mutant went unnoticed)"
"$py" -m pytest -q -p no:cacheprovider tests/test_masking_43174a1.py 2>&1 | tail -1
echo "== the current tests on the mutant (they must fail)"
if "$py" -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_properties.py > pytest.log 2>&1; then
  echo "the scattered mutant passed the current tests"; exit 1
fi
grep -E "^FAILED" pytest.log | sed 's/ - .*//'
echo "$(grep -cE "^FAILED" pytest.log) tests failed"
