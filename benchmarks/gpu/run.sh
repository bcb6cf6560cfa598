#!/usr/bin/env bash
# The whole GPU check in one command, on the borrowed GPU machine (no registry access):
#
#   bash benchmarks/gpu/run.sh            # results in $OUT (default ./gpu-out): check.json, check.md
#
# 1. installs the wheels benchmarks/gpu/prepare_wheels.sh prepared (deepspeed, pydantic, hjson,
#    ...) into a private folder with `pip install --no-index --no-deps --target` (falls back
#    to unpacking the wheels if that python has no pip), put first on PYTHONPATH;
# 2. checks that deepspeed and megaponder import, records the machine (nvidia-smi, versions);
# 3. runs benchmarks/gpu/check.py under a hard time limit (parts that would start after the
#    budget are skipped and reported as such).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-$ROOT/gpu-out}"
SITE="${SITE:-${TMPDIR:-/tmp}/megaponder-gpu-site}"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$HERE/wheels}"
BUDGET="${BUDGET_S:-400}"      # check.py starts no part after this many seconds
LIMIT="${LIMIT_S:-470}"        # and is killed after this many (under the 8-minute target)
mkdir -p "$OUT" "$SITE"
start=$(date +%s)

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "no wheels in $WHEELS: run benchmarks/gpu/prepare_wheels.sh on a machine with registry access" >&2
  exit 2
fi
if ! "$PY" -m pip install --no-index --no-deps --target "$SITE" -q "$WHEELS"/*.whl 2>"$OUT/pip.txt"; then
  echo "pip --target failed ($(tail -1 "$OUT/pip.txt")); unpacking the wheels instead"
  "$PY" - "$SITE" "$WHEELS"/*.whl <<'PYEOF'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PYEOF
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export DS_BUILD_OPS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi 2>&1 || true
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/machine.txt"
if ! "$PY" -c "import deepspeed, pydantic, megaponder.parallel; print('deepspeed', deepspeed.__version__)" >> "$OUT/machine.txt" 2>"$OUT/import.txt"; then
  echo "deepspeed/megaponder do not import:" >&2; tail -5 "$OUT/import.txt" >&2
  exit 3
fi
cat "$OUT/machine.txt"
timeout "$LIMIT" "$PY" "$HERE/check.py" --out "$OUT" --budget-s "$BUDGET" "$@" 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
echo "benchmarks/gpu/run.sh: exit $rc after $(( $(date +%s) - start )) s; results in $OUT"
exit "$rc"
