#!/usr/bin/env bash
# Prepare, on a machine WITH registry access, the wheels the borrowed GPU machine lacks.
#
#   bash benchmarks/gpu/prepare_wheels.sh            # -> benchmarks/gpu/wheels/ (git-ignored)
#
# The GPU machine (python 3.12, torch 2.11 + CUDA 13, transformers, numpy, psutil, tqdm,
# packaging, pyyaml) reaches no registry and has no deepspeed, pydantic or hjson. DeepSpeed
# publishes no wheel, so it is built here as a pure-Python wheel (DS_BUILD_OPS=0: no CUDA ops
# compiled now; megaponder uses torch's AdamW, so no DeepSpeed op is ever JIT-built there).
# Its import-time needs were found by importing it with only these on the path
# (benchmarks/gpu/run.sh checks the same import first). pydantic-core is the one binary wheel:
# it is fetched for CPython 3.12 manylinux x86_64, whatever this machine's python is.
# The folder plus the checkout must stay under 64 MiB (what a device run may carry).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$HERE/wheels}"
PY="${PYTHON:-python}"
DEEPSPEED="${DEEPSPEED_VERSION:-0.19.8}"
mkdir -p "$OUT"
rm -f "$OUT"/*.whl

# Pure-Python (py3-none-any) dependencies of deepspeed and pydantic, pinned to the versions
# the CPU pins resolve to, so the GPU run imports the same code as the CPU suite.
PURE="hjson==3.1.0 msgpack==1.2.4 py-cpuinfo==9.0.0 einops==0.8.2 pydantic==2.14.4
      annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
# Binary wheels for the GPU machine's interpreter (cp312, manylinux x86_64).
BINARY="pydantic-core==2.50.5 msgpack==1.2.4 ninja==1.13.2"

PLATFORM_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
               --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux2014_x86_64)
# msgpack has a pure fallback but ships cp312 wheels: take the binary one (faster, no build).
for spec in $BINARY; do
  "$PY" -m pip download --no-deps -q -d "$OUT" "${PLATFORM_ARGS[@]}" "$spec"
done
for spec in $PURE; do
  case "$spec" in msgpack==*) continue;; esac
  "$PY" -m pip download --no-deps -q -d "$OUT" --only-binary=:all: --python-version 3.12 \
      --implementation py --abi none --platform any "$spec" \
    || "$PY" -m pip download --no-deps -q -d "$OUT" "${PLATFORM_ARGS[@]}" "$spec"
done

# DeepSpeed: build the pure wheel from the sdist (no ops, no CUDA toolchain needed here).
DS_BUILD_OPS=0 DS_BUILD_STRING="" "$PY" -m pip wheel --no-deps -q -w "$OUT" "deepspeed==$DEEPSPEED"

ls -la "$OUT"
du -sh "$OUT"
total=$(du -sb "$OUT" | cut -f1)
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
  echo "wheel folder is $total bytes: over the 48 MiB share of the 64 MiB a device run carries" >&2
  exit 1
fi
echo "prepared $(ls "$OUT"/*.whl | wc -l) wheels in $OUT ($total bytes)"
