#!/usr/bin/env bash
# Build docker/Dockerfile with buildah (no Docker daemon) and print the image name:
#
#   docker/build_image.sh                          # on the CPU stand-in of the NGC base
#   BASE_IMAGE=nvcr.io/nvidia/pytorch:25.06-py3 docker/build_image.sh    # on the real one
#
# The base defaults to docker/ngc_standin/build.sh's image (built first if needed). Cached: the
# image is tagged with a hash of the base and of every file the build copies, and not rebuilt
# while they are unchanged; older megaponder images in the store are untagged (their layers stay
# as the build's step cache).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=docker/buildah_env.sh
source "$REPO/docker/buildah_env.sh"
need_root_and_tools buildah debootstrap

log() { echo "[image $(date +%T)] $*" >&2; }

BASE=${BASE_IMAGE:-$("$REPO/docker/ngc_standin/build.sh" | tail -1)}
cd "$REPO"
# what the Dockerfile copies: tracked and untracked files, less what git ignores (.venv,
# runs/, data/, built extensions: .dockerignore leaves the same out)
mapfile -t files < <(git ls-files -co --exclude-standard -- setup.py README.md BENCHMARKS.md \
    Makefile megaponder tools examples tests benchmarks docs docker requirements .dockerignore |
    sort -u | while read -r f; do [ -f "$f" ] && echo "$f"; done)
TAG="localhost/megaponder:$( (echo "$BASE"; bah inspect --type image --format '{{.FromImageID}}' "$BASE" \
    2>/dev/null || true; content_hash "${files[@]}") | sha256sum | cut -c1-16)"
if bah inspect --type image "$TAG" >/dev/null 2>&1; then
    log "cached: $TAG"
    echo "$TAG"
    exit 0
fi

t0=$SECONDS
log "building $TAG on $BASE"
# --pull=false: the stand-in exists only in this store. --layers: a code change reruns only the
# steps from the first COPY of code on (apt and pip stay cached while the base and
# requirements/gpu.txt are unchanged); the pip cache mount serves the wheels when they rerun.
bah bud --pull=false --layers --isolation chroot -f docker/Dockerfile \
    --build-arg "BASE_IMAGE=$BASE" -t "$TAG" . >&2
log "build took $((SECONDS - t0)) s"
# keep the store to the current image: drop older builds of this script
bah images --format '{{.Name}}:{{.Tag}}' | grep '^localhost/megaponder:' | grep -vxF "$TAG" |
    while read -r old; do bah rmi "$old" >/dev/null 2>&1 || true; done
# and drop the step cache of builds no image stands on any more (an older requirements/gpu.txt
# leaves a whole pip layer behind); the current image's steps are its parents and stay
bah rmi --prune >/dev/null 2>&1 || true
echo "$TAG"
